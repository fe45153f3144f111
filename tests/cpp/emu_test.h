// Tiny test harness for the CUDA emulation tests (no external dependencies).
#pragma once

#include <cuda_runtime.h>  // the emulation stand-in (csrc/emulation)

#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

// Same definitions as csrc/include/pyllm/cuda_compat.cuh uses in emulated builds.
#ifndef PYLLM_LAUNCH
#define PYLLM_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                  \
  ::pyllm_emu::launch(__FILE__, __LINE__, #kernel, kernel, dim3(grid), dim3(block), \
                      (size_t)(smem_bytes), ##__VA_ARGS__)
template <typename T>
__device__ inline T* pyllm_dynamic_smem() {
  return reinterpret_cast<T*>(::pyllm_emu::dynamic_smem());
}
#endif

namespace emu_test {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Case {
  const char* name;
  void (*fn)();
};
inline std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
struct Reg {
  Reg(const char* n, void (*f)()) { registry().push_back({n, f}); }
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  throw Failure(std::string(file) + ":" + std::to_string(line) + ": " + what);
}

// Runs `f`, which must throw std::runtime_error whose message contains every
// string in `needles`. Returns the message.
inline std::string expect_throw(const char* file, int line, const std::function<void()>& f,
                                std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    for (const auto& n : needles)
      if (msg.find(n) == std::string::npos)
        fail(file, line, "exception message lacks \"" + n + "\":\n    " + msg);
    return msg;
  }
  fail(file, line, "expected an exception, none was thrown");
}

// The three schedule orders (random with two seeds).
inline const std::vector<const char*>& orders() {
  static const std::vector<const char*> o = {"forward", "reverse", "random:1", "random:12345"};
  return o;
}

inline int run_all(int argc, char** argv) {
  int failed = 0, ran = 0;
  for (const Case& c : registry()) {
    if (argc > 1 && !std::strstr(c.name, argv[1])) continue;
    ++ran;
    try {
      c.fn();
      std::printf("[ OK ] %s\n", c.name);
    } catch (const std::exception& e) {
      ++failed;
      std::printf("[FAIL] %s\n    %s\n", c.name, e.what());
    }
    std::fflush(stdout);
  }
  std::printf("%d/%d tests passed\n", ran - failed, ran);
  ::pyllm_emu::set_order(nullptr);
  return failed ? 1 : (ran ? 0 : 1);
}

}  // namespace emu_test

#define EMU_TEST(name)                                      \
  static void name();                                       \
  static ::emu_test::Reg name##_registration(#name, name); \
  static void name()

#define EMU_CHECK(cond)                                                          \
  do {                                                                           \
    if (!(cond)) ::emu_test::fail(__FILE__, __LINE__, "check failed: " #cond);   \
  } while (0)

#define EMU_CHECK_MSG(cond, msg)                                                                      \
  do {                                                                                                \
    if (!(cond)) ::emu_test::fail(__FILE__, __LINE__, std::string("check failed: " #cond ": ") + (msg)); \
  } while (0)

#define EMU_EXPECT_THROW(stmt, ...) ::emu_test::expect_throw(__FILE__, __LINE__, [&]() { stmt; }, {__VA_ARGS__})
