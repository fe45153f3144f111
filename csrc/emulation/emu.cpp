// pyllm CUDA emulation runtime: fibers, per-block scheduler, worker pool.
// See docs/EMULATION.md.
#include "emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PYLLM_EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define PYLLM_EMU_ASAN 1
#endif
#if PYLLM_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Context switching: hand-written on x86-64 (SysV), ucontext elsewhere or when
// asked for (PYLLM_EMU_USE_UCONTEXT), or when shadow stacks (CET) are compiled in.
#if defined(__x86_64__) && !defined(PYLLM_EMU_USE_UCONTEXT) && !(defined(__CET__) && (__CET__ & 2))
#define PYLLM_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if PYLLM_EMU_ASM_SWITCH
extern "C" void pyllm_emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void pyllm_emu_ctx_start();
// pyllm_emu_ctx_switch(save, next): pushes the callee-saved registers plus MXCSR and
// the x87 control word, stores rsp to *save, loads rsp = next and pops the same.
// pyllm_emu_ctx_start: first "return address" of a new fiber; calls r13(r12).
asm(R"(
  .text
  .p2align 4
  .globl pyllm_emu_ctx_switch
  .hidden pyllm_emu_ctx_switch
  .type pyllm_emu_ctx_switch,@function
pyllm_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pyllm_emu_ctx_switch, .-pyllm_emu_ctx_switch

  .p2align 4
  .globl pyllm_emu_ctx_start
  .hidden pyllm_emu_ctx_start
  .type pyllm_emu_ctx_start,@function
pyllm_emu_ctx_start:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size pyllm_emu_ctx_start, .-pyllm_emu_ctx_start
)");
#endif

namespace pyllm_emu {
namespace detail {
namespace {

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------
std::mutex g_cfg_mu;
std::map<const void*, int> g_max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
int max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> lk(g_cfg_mu);
  const auto it = g_max_dyn_smem.find(kernel);
  return it == g_max_dyn_smem.end() ? 48 * 1024 : it->second;
}
std::string g_order_override;  // empty: environment
bool g_order_overridden = false;
std::atomic<int> g_threads_override{0};
std::atomic<int> g_stack_kb_override{0};

enum class OrderKind { Forward, Reverse, Random };
struct OrderCfg {
  OrderKind kind = OrderKind::Forward;
  std::uint64_t seed = 0;
  std::string text() const {
    switch (kind) {
      case OrderKind::Forward: return "forward";
      case OrderKind::Reverse: return "reverse";
      default: return "random:" + std::to_string(seed);
    }
  }
};

OrderCfg parse_order(const std::string& s) {
  OrderCfg c;
  if (s.empty() || s == "forward") return c;
  if (s == "reverse") {
    c.kind = OrderKind::Reverse;
    return c;
  }
  if (s.rfind("random", 0) == 0) {
    c.kind = OrderKind::Random;
    if (s.size() == 6) {
      std::random_device rd;
      c.seed = ((std::uint64_t)rd() << 32) ^ rd();
      c.seed %= 1000000007ull;  // short, easy to paste back
      return c;
    }
    if (s[6] == ':') {
      char* end = nullptr;
      const std::string num = s.substr(7);
      c.seed = std::strtoull(num.c_str(), &end, 0);
      if (!num.empty() && end && *end == '\0') return c;
    }
  }
  throw std::runtime_error("pyllm_emu: bad schedule order '" + s +
                           "' (PYLLM_EMU_ORDER / set_order): expected forward, reverse, random or random:<seed>");
}

OrderCfg current_order() {
  std::string s;
  {
    std::lock_guard<std::mutex> lk(g_cfg_mu);
    if (g_order_overridden) {
      s = g_order_override;
    } else {
      const char* e = std::getenv("PYLLM_EMU_ORDER");
      s = e ? e : "";
    }
  }
  return parse_order(s);
}

int env_int(const char* name, int dflt, int lo, int hi) {
  const char* e = std::getenv(name);
  if (!e || !*e) return dflt;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  if (!end || *end != '\0' || v < lo || v > hi)
    throw std::runtime_error(std::string("pyllm_emu: bad value '") + e + "' for " + name + " (expected " +
                             std::to_string(lo) + ".." + std::to_string(hi) + ")");
  return (int)v;
}

int current_threads() {
  const int o = g_threads_override.load();
  return o > 0 ? o : env_int("PYLLM_EMU_THREADS", 2, 1, 256);
}

size_t current_stack_bytes() {
  int kb = g_stack_kb_override.load();
  if (kb <= 0) {
#if PYLLM_EMU_ASAN
    const int dflt = 256;  // ASan frames are much larger
#else
    const int dflt = 64;
#endif
    kb = env_int("PYLLM_EMU_STACK_KB", dflt, 16, 1 << 20);
  }
  return (size_t)kb * 1024;
}

std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
struct Rng {
  std::uint64_t s;
  std::uint64_t next() { return s = mix64(s); }
  unsigned below(unsigned n) { return (unsigned)(next() % n); }
};

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------
std::string ranges(const std::vector<unsigned>& ids) {
  std::string out;
  size_t i = 0;
  while (i < ids.size()) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out.empty() ? "(none)" : out;
}

// "'k' (my_kernel<float>(float const*, int))": the launch expression plus, when the
// symbol is visible to dladdr, the demangled function name.
std::string kernel_desc(const LaunchDesc& d) {
  std::string s = std::string("'") + d.name + "'";
  Dl_info info;
  if (d.kernel_addr && dladdr(d.kernel_addr, &info) && info.dli_sname && info.dli_saddr == d.kernel_addr) {
    int st = -1;
    char* dem = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    const std::string full = st == 0 && dem ? dem : info.dli_sname;
    std::free(dem);
    if (full != d.name) s += " (" + full + ")";
  }
  return s;
}

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

const char* op_name(Op op) {
  switch (op) {
    case Op::Barrier: return "__syncthreads";
    case Op::BarrierCount: return "__syncthreads_count";
    case Op::BarrierAnd: return "__syncthreads_and";
    case Op::BarrierOr: return "__syncthreads_or";
    case Op::ShflIdx: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    case Op::SyncWarp: return "__syncwarp";
    case Op::ActiveMask: return "__activemask";
    case Op::Mma: return "mma.sync";
    case Op::Ldmatrix: return "ldmatrix.sync";
  }
  return "?";
}
bool is_barrier(Op op) { return op == Op::Barrier || op == Op::BarrierCount || op == Op::BarrierAnd || op == Op::BarrierOr; }

// Hook for debuggers: `break pyllm_emu_on_error` stops before an error is thrown.
extern "C" __attribute__((noinline, used)) void pyllm_emu_on_error(const char* msg) { asm volatile("" ::"r"(msg)); }

// ---------------------------------------------------------------------------
// Fiber stacks
// ---------------------------------------------------------------------------
constexpr std::uint64_t kCanary = 0x5ca1ab1edeadbeefull;
constexpr size_t kCanaryWords = 8;

size_t page_size() {
  static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
  return p;
}

struct Stack {
  char* map = nullptr;  // mapping start (guard page)
  size_t map_len = 0;
  char* lo = nullptr;  // usable [lo, hi)
  char* hi = nullptr;
};

Stack alloc_stack(size_t bytes) {
  const size_t pg = page_size();
  bytes = (bytes + pg - 1) / pg * pg;
  Stack s;
  s.map_len = bytes + pg;
  void* m = mmap(nullptr, s.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("pyllm_emu: cannot allocate fiber stack (mmap failed)");
  s.map = static_cast<char*>(m);
  mprotect(s.map, pg, PROT_NONE);  // guard page: overflow faults instead of corrupting
  s.lo = s.map + pg;
  s.hi = s.map + s.map_len;
  return s;
}
void free_stack(Stack& s) {
  if (s.map) munmap(s.map, s.map_len);
  s = Stack{};
}

// ---------------------------------------------------------------------------
// Fibers and the per-OS-thread block runner
// ---------------------------------------------------------------------------
enum class FState : unsigned char { Runnable, Waiting, Exited, Faulted };

struct Runner;

struct Fiber {
  ThreadState pub;  // what threadIdx etc. read
  FState state = FState::Runnable;
  bool started = false;
  Op op = Op::Barrier;
  unsigned mask = 0;
  int size = 0;
  int width = 32;
  long long param = 0;
  std::uint64_t value = 0;
  std::uint64_t result = 0;
  const char* file = nullptr;
  int line = 0;
  int col = 0;
  unsigned epoch = 0;  // resolution bookkeeping
#if PYLLM_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  Stack* stack = nullptr;
  Runner* runner = nullptr;
#if PYLLM_EMU_ASAN
  void* asan_fake = nullptr;
#endif
  std::string error;
  // cp.async: copies issued since the last commit_group, and committed groups (oldest first)
  struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes, src_bytes;
  };
  std::vector<AsyncCopy> async_open;
  std::vector<std::vector<AsyncCopy>> async_groups;
};

struct Runner {
  std::vector<Stack> stacks;
  size_t stack_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<std::array<unsigned char, 64>> xch;  // per-thread exchange slots (mma, ldmatrix)
  std::vector<unsigned> order;
  unsigned char* smem_raw = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_cap = 0;
  Fiber* current = nullptr;
  const LaunchDesc* desc = nullptr;
  BlockState block{};
  unsigned nthreads = 0;
  unsigned epoch = 0;
#if PYLLM_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
  std::uint64_t fpenv = 0;
#else
  ucontext_t sched_uc;
#endif
#if PYLLM_EMU_ASAN
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif

  ~Runner() {
    for (auto& s : stacks) free_stack(s);
    std::free(smem_raw);
  }

  void run_block(const LaunchDesc& d, const OrderCfg& ord, std::uint64_t linear);

 private:
  void prepare_stacks(unsigned n);
  void start_fiber(Fiber& f);
  void resume(Fiber& f);
  bool resolve();  // false: block finished
  // Completes the warp collectives (and __activemask groups) of warp w whose lanes have all
  // arrived; true if any did.
  bool resolve_warp(unsigned w, bool& warp_waiters, Fiber*& stuck);
  // Random order: runs warp w alone until each of its lanes waits at a block barrier or exits.
  template <typename Rng>
  void run_warp_to_barrier(unsigned w, Rng& rng);
  void run_fiber(Fiber& f);
  [[noreturn]] void fail(const std::string& what);
  std::string thread_desc(const std::vector<unsigned>& ids) const;
  Fiber& lane(unsigned warp, unsigned l) { return fibers[warp * 32 + l]; }
  unsigned lanes_in_warp(unsigned warp) const {
    const unsigned base = warp * 32;
    return nthreads - base >= 32 ? 32 : nthreads - base;
  }
  void complete_warp_group(unsigned w, unsigned mask, Op op);
  [[noreturn]] void diagnose_warp(Fiber& f);
  bool resolve_barrier();
};

thread_local Runner* t_runner = nullptr;  // set while this OS thread runs a block

Runner& this_thread_runner() {
  static thread_local std::unique_ptr<Runner> r;
  if (!r) r.reset(new Runner());
  return *r;
}

void fiber_main(void* arg);

#if !PYLLM_EMU_ASM_SWITCH
// makecontext passes int arguments only: split the pointer.
void fiber_main_uc(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>(((std::uintptr_t)hi << 32) | (std::uintptr_t)lo));
}
#endif

inline void switch_to_fiber(Runner& r, Fiber& f) {
#if PYLLM_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.sched_fake, f.stack->lo, (size_t)(f.stack->hi - f.stack->lo));
#endif
#if PYLLM_EMU_ASM_SWITCH
  pyllm_emu_ctx_switch(&r.sched_sp, f.sp);
#else
  swapcontext(&r.sched_uc, &f.uc);
#endif
#if PYLLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.sched_fake, nullptr, nullptr);
#endif
}

// Called on a fiber's stack: back to the scheduler. `final` for a finished fiber.
inline void switch_to_scheduler(Runner& r, Fiber& f, bool final) {
#if PYLLM_EMU_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake, r.sched_bottom, r.sched_size);
#else
  (void)final;
#endif
#if PYLLM_EMU_ASM_SWITCH
  pyllm_emu_ctx_switch(&f.sp, r.sched_sp);
#else
  swapcontext(&f.uc, &r.sched_uc);
#endif
#if PYLLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake, &r.sched_bottom, &r.sched_size);
#endif
}

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Runner& r = *f.runner;
#if PYLLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_bottom, &r.sched_size);
#endif
  try {
    r.desc->invoke(r.desc->payload);
    f.state = FState::Exited;
  } catch (const std::exception& e) {
    f.error = e.what();
    f.state = FState::Faulted;
  } catch (...) {
    f.error = "unknown C++ exception";
    f.state = FState::Faulted;
  }
  switch_to_scheduler(r, f, true);
  std::abort();  // never resumed
}

void Runner::prepare_stacks(unsigned n) {
  const size_t want = current_stack_bytes();
  if (want != stack_bytes) {
    for (auto& s : stacks) free_stack(s);
    stacks.clear();
    stack_bytes = want;
  }
  while (stacks.size() < n) stacks.push_back(alloc_stack(stack_bytes));
}

void Runner::start_fiber(Fiber& f) {
  Stack& s = *f.stack;
#if PYLLM_EMU_ASAN
  // The stack may hold stale poisoning from an abandoned fiber.
  ASAN_UNPOISON_MEMORY_REGION(s.lo, (size_t)(s.hi - s.lo));
#endif
  std::uint64_t* c = reinterpret_cast<std::uint64_t*>(s.lo);
  for (size_t i = 0; i < kCanaryWords; ++i) c[i] = kCanary;
#if PYLLM_EMU_ASM_SWITCH
  void** sp = reinterpret_cast<void**>((std::uintptr_t)s.hi & ~(std::uintptr_t)15);
  *--sp = reinterpret_cast<void*>(&pyllm_emu_ctx_start);  // return address
  *--sp = nullptr;                                        // rbp
  *--sp = nullptr;                                        // rbx
  *--sp = &f;                                             // r12: argument
  *--sp = reinterpret_cast<void*>(&fiber_main);           // r13: entry
  *--sp = nullptr;                                        // r14
  *--sp = nullptr;                                        // r15
  *--sp = reinterpret_cast<void*>(fpenv);                 // MXCSR | x87 CW << 32
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = s.lo;
  f.uc.uc_stack.ss_size = (size_t)(s.hi - s.lo);
  f.uc.uc_link = nullptr;
  const std::uintptr_t p = reinterpret_cast<std::uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main_uc), 2, (unsigned)(p >> 32), (unsigned)p);
#endif
  f.started = true;
}

void Runner::resume(Fiber& f) {
  current = &f;
  t_thread = &f.pub;
  switch_to_fiber(*this, f);
  t_thread = nullptr;
  current = nullptr;
}

std::string Runner::thread_desc(const std::vector<unsigned>& ids) const {
  std::string s = "threads " + ranges(ids);
  if (block.bdim.y > 1 || block.bdim.z > 1) s += " (linear ids)";
  return s;
}

void Runner::fail(const std::string& what) {
  const LaunchDesc& d = *desc;
  std::ostringstream os;
  os << "pyllm_emu: kernel " << kernel_desc(d) << " launched at " << d.file << ":" << d.line << " with grid ("
     << d.grid.x << "," << d.grid.y << "," << d.grid.z << ") block (" << d.block.x << "," << d.block.y << ","
     << d.block.z << "): in block (" << block.bid.x << "," << block.bid.y << "," << block.bid.z << "): " << what;
  pyllm_emu_on_error(os.str().c_str());
  throw std::runtime_error(os.str());
}

std::string site_of(const Fiber& f) {
  return std::string(f.file ? f.file : "?") + ":" + std::to_string(f.line) + ":" + std::to_string(f.col);
}
bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && a.col == b.col && (a.file == b.file || (a.file && b.file && !std::strcmp(a.file, b.file)));
}

void Runner::complete_warp_group(unsigned w, unsigned mask, Op op) {
  const unsigned n = lanes_in_warp(w);
  unsigned preds = 0;
  for (unsigned j = 0; j < 32; ++j)
    if ((mask >> j) & 1u)
      if (lane(w, j).value) preds |= 1u << j;
  for (unsigned j = 0; j < 32; ++j) {
    if (!((mask >> j) & 1u)) continue;
    Fiber& g = lane(w, j);
    switch (op) {
      case Op::Ballot: g.result = preds; break;
      case Op::Any: g.result = preds != 0; break;
      case Op::All: g.result = preds == mask; break;
      case Op::SyncWarp:
      case Op::Mma:
      case Op::Ldmatrix: g.result = 0; break;  // data goes through the exchange slots
      default: {
        const long long width = g.width;
        const long long seg = (long long)j & ~(width - 1);
        const long long seg_end = seg + width - 1;
        long long src = 0;
        bool own = false;
        if (op == Op::ShflIdx) {
          src = seg + (g.param & (width - 1));
        } else if (op == Op::ShflUp) {
          src = (long long)j - g.param;
          own = src < seg;
        } else if (op == Op::ShflDown) {
          src = (long long)j + g.param;
          own = src > seg_end;
        } else {  // xor: earlier segments are readable, later ones give the own value
          src = (long long)j ^ g.param;
          own = src > seg_end;
        }
        if (own) {
          g.result = g.value;
        } else if (src < 0 || src >= (long long)n || !((mask >> src) & 1u)) {
          // Undefined in CUDA: reading a lane that does not take part. Poison it.
          g.result = g.size >= 8 ? ~0ull : ((1ull << (8 * g.size)) - 1);
        } else {
          g.result = lane(w, (unsigned)src).value;
        }
      }
    }
    g.state = FState::Runnable;
    g.epoch = epoch;
  }
}

void Runner::diagnose_warp(Fiber& f) {
  const unsigned w = f.pub.warp;
  const unsigned n = lanes_in_warp(w);
  std::vector<unsigned> here, missing, exited;
  std::vector<std::pair<std::string, std::vector<unsigned>>> elsewhere;
  auto add_else = [&](const std::string& k, unsigned j) {
    for (auto& e : elsewhere)
      if (e.first == k) {
        e.second.push_back(j);
        return;
      }
    elsewhere.push_back({k, {j}});
  };
  for (unsigned j = 0; j < 32; ++j) {
    if (!((f.mask >> j) & 1u)) continue;
    if (j >= n) {
      missing.push_back(j);
      continue;
    }
    Fiber& g = lane(w, j);
    if (g.state == FState::Exited) {
      exited.push_back(j);
    } else if (g.state != FState::Waiting) {
      add_else("are not waiting", j);
    } else if (g.op == f.op && same_site(g, f) && g.mask == f.mask) {
      here.push_back(j);
    } else if (g.op == f.op && same_site(g, f)) {
      add_else("are at the same " + std::string(op_name(g.op)) + " but with mask " + hex(g.mask), j);
    } else {
      std::string k = "are waiting at " + std::string(op_name(g.op)) + " at " + site_of(g);
      if (!is_barrier(g.op) && g.op != Op::ActiveMask) k += " (mask " + hex(g.mask) + ")";
      add_else(k, j);
    }
  }
  std::ostringstream os;
  os << "warp rendezvous failed in warp " << w << " (threads " << w * 32 << "-" << w * 32 + 31 << "): lanes "
     << ranges(here) << " wait at " << op_name(f.op) << " at " << site_of(f) << " with mask " << hex(f.mask)
     << ", but";
  bool first = true;
  auto sep = [&]() {
    os << (first ? " " : "; and ");
    first = false;
  };
  if (!exited.empty()) {
    sep();
    os << "lanes " << ranges(exited) << " named in the mask have exited";
  }
  if (!missing.empty()) {
    sep();
    os << "lanes " << ranges(missing) << " named in the mask do not exist (the block has " << nthreads
       << " threads)";
  }
  for (auto& e : elsewhere) {
    sep();
    os << "lanes " << ranges(e.second) << " named in the mask " << e.first;
  }
  os << ". Every lane named in a *_sync mask must call the same intrinsic with the same mask "
        "(e.g. a half-warp reduction needs mask 0x0000ffff, not 0xffffffff).";
  fail(os.str());
}

bool Runner::resolve_barrier() {
  std::vector<unsigned> exited;
  std::vector<std::pair<const Fiber*, std::vector<unsigned>>> sites;
  unsigned waiting = 0;
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = fibers[i];
    if (f.state == FState::Exited) {
      exited.push_back(i);
      continue;
    }
    ++waiting;  // all non-exited fibers are Waiting at a barrier here
    bool found = false;
    for (auto& s : sites)
      if (s.first->op == f.op && same_site(*s.first, f)) {
        s.second.push_back(i);
        found = true;
        break;
      }
    if (!found) sites.push_back({&f, {i}});
  }
  if (waiting == 0) return false;  // block finished
  if (sites.size() > 1) {
    std::ostringstream os;
    os << "divergent barrier: threads of the block wait at different barriers:";
    for (auto& s : sites) os << " " << thread_desc(s.second) << " at " << op_name(s.first->op) << " " << site_of(*s.first) << ";";
    if (!exited.empty()) os << " " << thread_desc(exited) << " have exited;";
    os << " every thread of a block must reach the same __syncthreads (barriers in divergent code are undefined "
          "behaviour on a GPU).";
    fail(os.str());
  }
  if (!exited.empty()) {
    std::ostringstream os;
    os << op_name(sites[0].first->op) << " at " << site_of(*sites[0].first) << " can never complete: "
       << thread_desc(sites[0].second) << " wait there but " << thread_desc(exited)
       << " have already exited (returned early?). Every thread of the block must reach every __syncthreads: "
          "guard the work instead of returning.";
    fail(os.str());
  }
  const Op op = sites[0].first->op;
  unsigned count = 0;
  for (unsigned i = 0; i < nthreads; ++i) count += fibers[i].value ? 1u : 0u;
  std::uint64_t res = 0;
  if (op == Op::BarrierCount) res = count;
  if (op == Op::BarrierAnd) res = count == nthreads;
  if (op == Op::BarrierOr) res = count != 0;
  for (unsigned i = 0; i < nthreads; ++i) {
    fibers[i].result = res;
    fibers[i].state = FState::Runnable;
  }
  return true;
}

bool Runner::resolve_warp(unsigned w, bool& warp_waiters, Fiber*& stuck) {
  const unsigned n = lanes_in_warp(w);
  bool progress = false, active_waiters = false;
  for (unsigned l = 0; l < n; ++l) {
    Fiber& f = lane(w, l);
    if (f.state != FState::Waiting || is_barrier(f.op) || f.epoch == epoch) continue;
    if (f.op == Op::ActiveMask) {
      active_waiters = true;
      continue;
    }
    warp_waiters = true;
    bool ok = true;
    for (unsigned j = 0; j < 32 && ok; ++j) {
      if (!((f.mask >> j) & 1u)) continue;
      if (j >= n) {
        ok = false;
        break;
      }
      Fiber& g = lane(w, j);
      ok = g.state == FState::Waiting && g.epoch != epoch && g.op == f.op && g.mask == f.mask &&
           (f.op == Op::SyncWarp || same_site(g, f));
    }
    if (ok) {
      complete_warp_group(w, f.mask, f.op);
      progress = true;
    } else if (!stuck) {
      stuck = &f;
    }
  }
  if (progress || !active_waiters) return progress;
  // Lanes of a warp waiting at the same __activemask call are the converged set (only once no
  // collective of the warp can complete: the lanes still running would join it).
  for (unsigned l = 0; l < n; ++l) {
    Fiber& f = lane(w, l);
    if (f.state != FState::Waiting || f.op != Op::ActiveMask || f.epoch == epoch) continue;
    unsigned m = 0;
    for (unsigned j = l; j < n; ++j) {
      Fiber& g = lane(w, j);
      if (g.state == FState::Waiting && g.op == Op::ActiveMask && same_site(g, f)) m |= 1u << j;
    }
    for (unsigned j = l; j < n; ++j)
      if ((m >> j) & 1u) {
        lane(w, j).result = m;
        lane(w, j).state = FState::Runnable;
        lane(w, j).epoch = epoch;
      }
  }
  return true;
}

// Called after a full round (no fiber runnable). Returns false when all exited.
bool Runner::resolve() {
  ++epoch;
  const unsigned nwarps = (nthreads + 31) / 32;
  bool progress = false, warp_waiters = false;
  Fiber* stuck = nullptr;
  for (unsigned w = 0; w < nwarps; ++w) progress |= resolve_warp(w, warp_waiters, stuck);
  if (progress) return true;
  if (warp_waiters) diagnose_warp(*stuck);
  return resolve_barrier();
}

void Runner::run_fiber(Fiber& f) {
  if (!f.started) start_fiber(f);
  resume(f);
  if (f.state == FState::Faulted) {
    const uint3 t = f.pub.tid;
    fail("thread " + std::to_string(f.pub.linear) + " (threadIdx " + std::to_string(t.x) + "," +
         std::to_string(t.y) + "," + std::to_string(t.z) + "): " + f.error);
  }
}

template <typename Rng>
void Runner::run_warp_to_barrier(unsigned w, Rng& rng) {
  const unsigned n = lanes_in_warp(w);
  unsigned lanes[32];
  for (unsigned l = 0; l < n; ++l) lanes[l] = l;
  for (;;) {
    for (unsigned i = n; i > 1; --i) std::swap(lanes[i - 1], lanes[rng.below(i)]);
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = lane(w, lanes[i]);
      if (f.state == FState::Runnable) run_fiber(f);
    }
    ++epoch;
    bool warp_waiters = false;
    Fiber* stuck = nullptr;
    // Nothing completed: every lane waits at a block barrier or has exited (or the warp is stuck
    // at a collective, which resolve() diagnoses once the other warps have run).
    if (!resolve_warp(w, warp_waiters, stuck)) return;
  }
}

void Runner::run_block(const LaunchDesc& d, const OrderCfg& ord, std::uint64_t linear) {
  desc = &d;
  const unsigned bx = d.block.x, by = d.block.y, bz = d.block.z;
  nthreads = bx * by * bz;
  block.bdim = d.block;
  block.gdim = d.grid;
  block.bid.x = (unsigned)(linear % d.grid.x);
  block.bid.y = (unsigned)((linear / d.grid.x) % d.grid.y);
  block.bid.z = (unsigned)(linear / ((std::uint64_t)d.grid.x * d.grid.y));

  // Dynamic shared memory: 16-byte aligned, NaN (0xFF) filled.
  const size_t need = d.smem_bytes ? d.smem_bytes : 16;
  if (need > smem_cap) {
    std::free(smem_raw);
    smem_cap = (need + 4095) & ~(size_t)4095;
    smem_raw = static_cast<unsigned char*>(std::malloc(smem_cap + 64));
    if (!smem_raw) throw std::runtime_error("pyllm_emu: out of memory for dynamic shared memory");
    smem = reinterpret_cast<unsigned char*>(((std::uintptr_t)smem_raw + 63) & ~(std::uintptr_t)63);
  }
#if PYLLM_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(smem, smem_cap);
#endif
  std::memset(smem, 0xFF, d.smem_bytes);
#if PYLLM_EMU_ASAN
  // Accesses past smem_bytes are reported by ASan.
  ASAN_POISON_MEMORY_REGION(smem + d.smem_bytes, smem_cap - d.smem_bytes);
#endif
  block.smem = smem;
  block.smem_bytes = d.smem_bytes;

  prepare_stacks(nthreads);
  if (fibers.size() < nthreads) fibers.resize(nthreads);
  if (xch.size() < nthreads) xch.resize(nthreads);
#if PYLLM_EMU_ASM_SWITCH
  {
    unsigned mx = 0;
    unsigned short cw = 0;
    asm volatile("stmxcsr %0" : "=m"(mx));
    asm volatile("fnstcw %0" : "=m"(cw));
    fpenv = (std::uint64_t)mx | ((std::uint64_t)cw << 32);
  }
#endif
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = fibers[i];
    f.pub.tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
    f.pub.lane = i % 32;
    f.pub.warp = i / 32;
    f.pub.linear = i;
    f.state = FState::Runnable;
    f.started = false;
    f.value = f.result = 0;
    f.epoch = 0;
    f.error.clear();
    f.async_open.clear();
    f.async_groups.clear();
    f.stack = &stacks[i];
    f.runner = this;
#if PYLLM_EMU_ASAN
    f.asan_fake = nullptr;
#endif
  }
  epoch = 0;
  order.resize(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = ord.kind == OrderKind::Reverse ? nthreads - 1 - i : i;
  Rng rng{mix64(ord.seed ^ mix64(linear + 0x1234567ull))};

  struct Scope {
    Runner* r;
    Scope(Runner* rr) : r(rr) {
      t_runner = r;
      t_block = &r->block;
    }
    ~Scope() {
      t_runner = nullptr;
      t_block = nullptr;
      t_thread = nullptr;
    }
  } scope(this);

  // Forward / reverse: every runnable thread runs to its next warp collective or barrier, round
  // after round, so the warps of a block advance together. Random: between two block barriers the
  // warps run one at a time, in a random order (lanes shuffled within the warp): the GPU may run
  // a warp that far ahead of the others, and a missing __syncthreads then shows as a wrong result
  // (one warp overwrites shared memory before another has read it, or reads it before it is written).
  const unsigned nwarps = (nthreads + 31) / 32;
  std::vector<unsigned> worder(nwarps);
  for (unsigned w = 0; w < nwarps; ++w) worder[w] = w;
  for (;;) {
    if (ord.kind == OrderKind::Random) {
      for (unsigned i = nwarps; i > 1; --i) std::swap(worder[i - 1], worder[rng.below(i)]);
      for (unsigned w : worder) run_warp_to_barrier(w, rng);
    } else {
      for (unsigned k = 0; k < nthreads; ++k) {
        Fiber& f = fibers[order[k]];
        if (f.state == FState::Runnable) run_fiber(f);
      }
    }
    if (!resolve()) break;
  }
  for (unsigned i = 0; i < nthreads; ++i) {
    const std::uint64_t* c = reinterpret_cast<const std::uint64_t*>(stacks[i].lo);
    for (size_t k = 0; k < kCanaryWords; ++k)
      if (c[k] != kCanary)
        fail("fiber stack overflow in thread " + std::to_string(i) + " (stack " + std::to_string(stack_bytes / 1024) +
             " KiB); raise PYLLM_EMU_STACK_KB or use less local memory");
  }
}

// ---------------------------------------------------------------------------
// Grid jobs and the worker pool
// ---------------------------------------------------------------------------
struct Job {
  const LaunchDesc* desc;
  OrderCfg order;
  std::uint64_t nblocks;
  std::vector<std::uint32_t> perm;  // random block order
  std::atomic<std::uint64_t> next{0};
  std::atomic<bool> aborted{false};
  std::mutex err_mu;
  std::string error;
  int max_helpers = 0;
  int helpers = 0;  // guarded by the pool mutex

  bool has_work() const { return !aborted.load(std::memory_order_relaxed) && next.load(std::memory_order_relaxed) < nblocks; }

  void work() {
    Runner& r = this_thread_runner();
    for (;;) {
      if (aborted.load(std::memory_order_relaxed)) return;
      const std::uint64_t i = next.fetch_add(1);
      if (i >= nblocks) return;
      std::uint64_t b = i;
      if (order.kind == OrderKind::Reverse) b = nblocks - 1 - i;
      if (order.kind == OrderKind::Random) b = perm[i];
      try {
        r.run_block(*desc, order, b);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(err_mu);
        if (error.empty()) error = e.what();
        aborted = true;
      }
    }
  }
};

struct Pool {
  std::mutex mu;
  std::condition_variable cv, done_cv;
  std::vector<Job*> jobs;
  int spawned = 0;

  void worker() {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      Job* j = nullptr;
      for (Job* c : jobs)
        if (c->helpers < c->max_helpers && c->has_work()) {
          j = c;
          break;
        }
      if (!j) {
        cv.wait(lk);
        continue;
      }
      ++j->helpers;
      lk.unlock();
      j->work();
      lk.lock();
      if (--j->helpers == 0) done_cv.notify_all();
    }
  }
  void submit(Job* j) {
    std::lock_guard<std::mutex> lk(mu);
    while (spawned < j->max_helpers) {
      std::thread(&Pool::worker, this).detach();
      ++spawned;
    }
    jobs.push_back(j);
    cv.notify_all();
  }
  void retire(Job* j) {
    std::unique_lock<std::mutex> lk(mu);
    jobs.erase(std::find(jobs.begin(), jobs.end(), j));
    done_cv.wait(lk, [&] { return j->helpers == 0; });
  }
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_mu;

void reset_pool_in_child() { g_pool.store(nullptr); }  // the parent's workers do not exist here

Pool& pool() {
  Pool* p = g_pool.load();
  if (p) return *p;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  p = g_pool.load();
  if (!p) {
    static bool atfork = (pthread_atfork(nullptr, nullptr, &reset_pool_in_child), true);
    (void)atfork;
    p = new Pool();  // intentionally leaked: workers live for the whole process
    g_pool.store(p);
  }
  return *p;
}

}  // namespace

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------
void not_in_kernel(const char* what) {
  std::fprintf(stderr, "pyllm_emu: %s used outside of a kernel launched through pyllm_emu::launch\n", what);
  std::abort();
}

std::uint64_t sync_point(Op op, unsigned mask, std::uint64_t value, int size, long long param, int width,
                         const char* file, int line, int col) {
  Runner* r = t_runner;
  Fiber* f = r ? r->current : nullptr;
  if (!f) not_in_kernel(op_name(op));
  const bool warp_op = !is_barrier(op) && op != Op::ActiveMask;
  if (warp_op && !((mask >> f->pub.lane) & 1u)) {
    throw std::runtime_error(std::string(op_name(op)) + " at " + file + ":" + std::to_string(line) + ":" +
                             std::to_string(col) + ": lane " + std::to_string(f->pub.lane) +
                             " calls it with mask " + hex(mask) + " that does not include itself");
  }
  if (warp_op && (width < 1 || width > 32 || (width & (width - 1)))) {
    throw std::runtime_error(std::string(op_name(op)) + " at " + file + ":" + std::to_string(line) +
                             ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  }
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->size = size;
  f->param = param;
  f->width = width;
  f->file = file;
  f->line = line;
  f->col = col;
  f->state = FState::Waiting;
  switch_to_scheduler(*r, *f, false);
  return f->result;
}

void run_grid(const LaunchDesc& d) {
  if (t_thread) throw std::runtime_error("pyllm_emu: kernel launch from device code is not supported");
  auto cfg_error = [&](const std::string& m) {
    std::ostringstream os;
    os << "pyllm_emu: kernel " << kernel_desc(d) << " launched at " << d.file << ":" << d.line << " with grid ("
       << d.grid.x << "," << d.grid.y << "," << d.grid.z << ") block (" << d.block.x << "," << d.block.y << "," << d.block.z
       << "): invalid configuration: " << m;
    pyllm_emu_on_error(os.str().c_str());
    throw std::runtime_error(os.str());
  };
  const std::uint64_t nthreads = (std::uint64_t)d.block.x * d.block.y * d.block.z;
  const std::uint64_t nblocks = (std::uint64_t)d.grid.x * d.grid.y * d.grid.z;
  if (nthreads == 0 || nblocks == 0) cfg_error("zero-sized grid or block");
  if (nthreads > 1024) cfg_error("more than 1024 threads per block");
  if (d.block.z > 64) cfg_error("blockDim.z > 64");
  if (d.grid.x > 0x7fffffffu || d.grid.y > 65535 || d.grid.z > 65535) cfg_error("grid dimension too large");
  if (d.smem_bytes > 227 * 1024) cfg_error("dynamic shared memory above 227 KiB");
  if (d.smem_bytes > 48 * 1024) {
    const int optin = max_dynamic_smem(d.kernel_addr);
    if ((size_t)optin < d.smem_bytes)
      cfg_error(std::to_string(d.smem_bytes) + " bytes of dynamic shared memory is above the 48 KiB default and the "
                "kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (" + std::to_string(optin) +
                "); call cudaFuncSetAttribute before launching");
  }
  if (nblocks > 0xffffffffull) cfg_error("too many blocks for the emulator");

  Job job;
  job.desc = &d;
  job.order = current_order();
  job.nblocks = nblocks;
  if (job.order.kind == OrderKind::Random) {
    job.perm.resize(nblocks);
    for (std::uint64_t i = 0; i < nblocks; ++i) job.perm[i] = (std::uint32_t)i;
    Rng rng{mix64(job.order.seed)};
    for (std::uint64_t i = nblocks; i > 1; --i) {
      const std::uint64_t k = rng.next() % i;
      std::swap(job.perm[i - 1], job.perm[k]);
    }
  }
  const int threads = current_threads();
  job.max_helpers = (int)std::min<std::uint64_t>((std::uint64_t)(threads - 1), nblocks - 1);
  if (job.max_helpers > 0) pool().submit(&job);
  job.work();  // the launching thread runs blocks too
  if (job.max_helpers > 0) pool().retire(&job);
  if (!job.error.empty()) {
    std::string msg = job.error + " [schedule order " + job.order.text() + "; reproduce with PYLLM_EMU_ORDER=" +
                      job.order.text() + " PYLLM_EMU_THREADS=1]";
    pyllm_emu_on_error(msg.c_str());
    throw std::runtime_error(msg);
  }
}


// ---------------------------------------------------------------------------
// Tensor-core and async-copy instructions (see emu.h). Written from the PTX ISA's
// fragment-layout tables; tests/cpp/test_emu_tensorcore.cu holds them against those tables.
// ---------------------------------------------------------------------------
namespace {

struct Here {
  Runner* r;
  Fiber* f;
};
Here here(const char* what) {
  Runner* r = t_runner;
  Fiber* f = r ? r->current : nullptr;
  if (!f) not_in_kernel(what);
  return {r, f};
}

[[noreturn]] void instr_error(const Fiber& f, const char* instr, const char* file, int line, int col,
                              const std::string& msg) {
  throw std::runtime_error(std::string(instr) + " at " + file + ":" + std::to_string(line) + ":" +
                           std::to_string(col) + ": thread " + std::to_string(f.pub.linear) + " (warp " +
                           std::to_string(f.pub.warp) + ", lane " + std::to_string(f.pub.lane) + "): " + msg);
}

bool in_smem(const Runner& r, const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(r.block.smem);
  const auto* q = static_cast<const unsigned char*>(p);
  return q >= b && q + bytes <= b + r.block.smem_bytes;
}

std::string ptr_str(const void* p) {
  std::ostringstream os;
  os << p;
  return os.str();
}

// Half / bfloat16 bits -> float (exact).
float b16_to_float(std::uint16_t h, bool bf16) {
  if (bf16) return from_bits<float>((std::uint64_t)((std::uint32_t)h << 16));
  return f16_bits_to_f32(h);
}
std::uint16_t half_of(std::uint32_t reg, int which) { return (std::uint16_t)(which ? reg >> 16 : reg & 0xffffu); }

}  // namespace

void mma_m16n8k16_impl(float* d, const std::uint32_t* a, const std::uint32_t* b, const float* c, bool bf16,
                       const char* file, int line, int col) {
  Here h = here("mma.sync");
  const unsigned me = h.f->pub.linear, lane = h.f->pub.lane, base = me - lane;
  if (h.r->nthreads - base < 32)
    instr_error(*h.f, "mma.sync.m16n8k16", file, line, col, "the warp is partial (the block's last warp has " +
                std::to_string(h.r->nthreads - base) + " threads); mma.sync needs all 32 lanes");
  unsigned char* slot = h.r->xch[me].data();
  std::memcpy(slot, a, 16);
  std::memcpy(slot + 16, b, 8);
  sync_point(Op::Mma, 0xffffffffu, 0, 0, bf16, 32, file, line, col);
  // A (16 x 16, row-major), B (16 x 8, "col": K x N) from every lane's fragments, ISA layout:
  //   A: a_i of lane l (i = 0..7, two per register, low half first): row g + 8*((i/2)%2),
  //      col 2t + (i%2) + 8*(i/4), with g = l/4, t = l%4.
  //   B: b_i (i = 0..3): row (k) 2t + (i%2) + 8*(i/2), col (n) g.
  double A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned char* sl = h.r->xch[base + l].data();
    std::uint32_t ar[4], br[2];
    std::memcpy(ar, sl, 16);
    std::memcpy(br, sl + 16, 8);
    const unsigned g = l / 4, t = l % 4;
    for (int i = 0; i < 8; ++i)
      A[g + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = b16_to_float(half_of(ar[i / 2], i % 2), bf16);
    for (int i = 0; i < 4; ++i) B[2 * t + (i % 2) + 8 * (i / 2)][g] = b16_to_float(half_of(br[i / 2], i % 2), bf16);
  }
  // Wait until every lane has read the slots before any lane can overwrite its own.
  sync_point(Op::Mma, 0xffffffffu, 0, 0, bf16, 32, file, line, col);
  // D/C: c_i (i = 0..3) of lane l: row g + 8*(i/2), col 2t + (i%2).
  const unsigned g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), cc = 2 * t + (i % 2);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][cc];  // products of halves are exact in fp64
    d[i] = (float)((double)c[i] + acc);
  }
}

std::atomic<std::uint64_t> g_ldm_phases{0}, g_ldm_extra{0};

// Wavefronts beyond the first that one 8x8 ldmatrix phase costs: 8 rows of 16 bytes; bank of
// a 4-byte word = (address / 4) % 32; a bank delivers one distinct word per wavefront.
unsigned ldmatrix_extra_wavefronts(const void* const rows[8]) {
  std::uintptr_t words[32][32];
  unsigned count[32] = {}, worst = 1;
  for (int r = 0; r < 8; ++r)
    for (int w = 0; w < 4; ++w) {
      const std::uintptr_t word = (std::uintptr_t)rows[r] / 4 + (std::uintptr_t)w;
      const unsigned bank = (unsigned)(word % 32);
      bool seen = false;
      for (unsigned i = 0; i < count[bank]; ++i) seen = seen || words[bank][i] == word;
      if (!seen) words[bank][count[bank]++] = word;
      worst = std::max(worst, count[bank]);
    }
  return worst - 1;
}

void ldmatrix_impl(std::uint32_t* r, int num, bool trans, const void* addr, const char* file, int line, int col) {
  Here h = here("ldmatrix.sync");
  const char* instr = trans ? "ldmatrix.sync.m8n8.trans" : "ldmatrix.sync.m8n8";
  if (num != 1 && num != 2 && num != 4)
    instr_error(*h.f, instr, file, line, col, ".num must be x1, x2 or x4, got " + std::to_string(num));
  const unsigned me = h.f->pub.linear, lane = h.f->pub.lane, base = me - lane;
  if (h.r->nthreads - base < 32)
    instr_error(*h.f, instr, file, line, col, "the warp is partial; ldmatrix.sync needs all 32 lanes");
  // Only lanes 0 .. 8*num-1 supply addresses (the ISA ignores the others).
  if (lane < 8u * (unsigned)num) {
    if (((std::uintptr_t)addr & 15u) != 0)
      instr_error(*h.f, instr, file, line, col, "row address " + ptr_str(addr) +
                  " is not 16-byte aligned (each row is 8 contiguous b16 elements at a 16-byte boundary)");
    if (!in_smem(*h.r, addr, 16))
      instr_error(*h.f, instr, file, line, col, "row address " + ptr_str(addr) +
                  " is not inside the block's dynamic shared memory (" + std::to_string(h.r->block.smem_bytes) +
                  " bytes; pyllm kernels take shared memory from pyllm_dynamic_smem)");
  }
  std::memcpy(h.r->xch[me].data(), &addr, sizeof addr);
  sync_point(Op::Ldmatrix, 0xffffffffu, 0, 0, num * 2 + trans, 32, file, line, col);
  if (lane == 0) {
    unsigned extra = 0;
    for (int m = 0; m < num; ++m) {
      const void* rows[8];
      for (int rr = 0; rr < 8; ++rr) std::memcpy(&rows[rr], h.r->xch[base + 8 * m + rr].data(), sizeof(void*));
      extra += ldmatrix_extra_wavefronts(rows);
    }
    g_ldm_phases.fetch_add((std::uint64_t)num, std::memory_order_relaxed);
    g_ldm_extra.fetch_add(extra, std::memory_order_relaxed);
  }
  std::uint32_t out[4] = {0, 0, 0, 0};
  for (int m = 0; m < num; ++m) {
    auto row_addr = [&](unsigned rr) {
      const void* p;
      std::memcpy(&p, h.r->xch[base + 8 * m + rr].data(), sizeof p);
      return static_cast<const std::uint16_t*>(p);
    };
    std::uint16_t e[2];
    for (int k = 0; k < 2; ++k)
      e[k] = trans ? row_addr(2 * (lane % 4) + k)[lane / 4] : row_addr(lane / 4)[2 * (lane % 4) + k];
    out[m] = (std::uint32_t)e[0] | ((std::uint32_t)e[1] << 16);
  }
  sync_point(Op::Ldmatrix, 0xffffffffu, 0, 0, num * 2 + trans, 32, file, line, col);
  for (int m = 0; m < num; ++m) r[m] = out[m];
}

void cp_async_impl(void* dst, const void* src, int cp_size, int src_size, bool cg, const char* file, int line,
                   int col) {
  Here h = here("cp.async");
  const char* instr = cg ? "cp.async.cg.shared.global" : "cp.async.ca.shared.global";
  if (cg ? cp_size != 16 : (cp_size != 4 && cp_size != 8 && cp_size != 16))
    instr_error(*h.f, instr, file, line, col, std::string("cp-size must be ") + (cg ? "16" : "4, 8 or 16") +
                " bytes, got " + std::to_string(cp_size));
  if (src_size < 0 || src_size > cp_size)
    instr_error(*h.f, instr, file, line, col, "src-size " + std::to_string(src_size) + " is outside [0, cp-size " +
                std::to_string(cp_size) + "]");
  if (((std::uintptr_t)dst % (unsigned)cp_size) != 0 || (src_size > 0 && ((std::uintptr_t)src % (unsigned)cp_size) != 0))
    instr_error(*h.f, instr, file, line, col, "addresses must be aligned to cp-size " + std::to_string(cp_size) +
                " (dst " + ptr_str(dst) + ", src " + ptr_str(src) + ")");
  if (!in_smem(*h.r, dst, (size_t)cp_size))
    instr_error(*h.f, instr, file, line, col, "destination " + ptr_str(dst) +
                " is not inside the block's dynamic shared memory");
  h.f->async_open.push_back({dst, src, cp_size, src_size});
}

void cp_async_commit_impl(const char*, int, int) {
  Here h = here("cp.async.commit_group");
  h.f->async_groups.push_back(std::move(h.f->async_open));
  h.f->async_open.clear();
}

void cp_async_wait_impl(int n, const char* file, int line, int col) {
  Here h = here("cp.async.wait_group");
  if (n < 0) instr_error(*h.f, "cp.async.wait_group", file, line, col, "N must be >= 0");
  auto& gs = h.f->async_groups;
  const size_t land = gs.size() > (size_t)n ? gs.size() - (size_t)n : 0;
  for (size_t i = 0; i < land; ++i)
    for (const auto& c : gs[i]) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
    }
  gs.erase(gs.begin(), gs.begin() + (std::ptrdiff_t)land);
}

int cp_async_pending_impl() { return (int)here("cp.async").f->async_groups.size(); }

}  // namespace detail

void* dynamic_smem() {
  const detail::BlockState* b = detail::t_block;
  if (!b || !detail::t_thread) detail::not_in_kernel("dynamic_smem()");
  return b->smem;
}

void set_order(const char* order) {
  if (order) detail::parse_order(order);  // validate now
  std::lock_guard<std::mutex> lk(detail::g_cfg_mu);
  detail::g_order_overridden = order != nullptr;
  detail::g_order_override = order ? order : "";
}
void set_num_threads(int n) { detail::g_threads_override = n > 0 ? n : 0; }
void set_stack_kb(int kb) { detail::g_stack_kb_override = kb > 0 ? kb : 0; }

void mma_m16n8k16(float* d, const std::uint32_t* a, const std::uint32_t* b, const float* c, bool bf16,
                  const char* file, int line, int col) {
  detail::mma_m16n8k16_impl(d, a, b, c, bf16, file, line, col);
}
void ldmatrix(std::uint32_t* r, int num, bool trans, const void* addr, const char* file, int line, int col) {
  detail::ldmatrix_impl(r, num, trans, addr, file, line, col);
}
void cp_async(void* dst, const void* src, int cp_size, int src_size, bool cg, const char* file, int line, int col) {
  detail::cp_async_impl(dst, src, cp_size, src_size, cg, file, line, col);
}
void cp_async_commit(const char* file, int line, int col) { detail::cp_async_commit_impl(file, line, col); }
void cp_async_wait(int n, const char* file, int line, int col) { detail::cp_async_wait_impl(n, file, line, col); }
int cp_async_pending_groups() { return detail::cp_async_pending_impl(); }
void ldmatrix_bank_stats(std::uint64_t* phases, std::uint64_t* extra, bool reset) {
  const std::uint64_t ph = reset ? detail::g_ldm_phases.exchange(0) : detail::g_ldm_phases.load();
  const std::uint64_t ex = reset ? detail::g_ldm_extra.exchange(0) : detail::g_ldm_extra.load();
  if (phases) *phases = ph;
  if (extra) *extra = ex;
}

cudaError_t func_set_attribute(const void* kernel, int attr, int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return (value >= -1 && value <= 100) ? cudaSuccess : cudaErrorInvalidValue;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(detail::g_cfg_mu);
  detail::g_max_dyn_smem[kernel] = value;
  return cudaSuccess;
}

}  // namespace pyllm_emu

// For debuggers: `call pyllm_emu_debug_print()` prints the current CUDA thread.
extern "C" __attribute__((used, noinline)) void pyllm_emu_debug_print() {
  using namespace pyllm_emu::detail;
  if (!t_thread || !t_block) {
    std::fprintf(stderr, "pyllm_emu: not inside an emulated kernel on this OS thread\n");
    return;
  }
  std::fprintf(stderr, "pyllm_emu: blockIdx=(%u,%u,%u) threadIdx=(%u,%u,%u) lane=%u warp=%u blockDim=(%u,%u,%u) gridDim=(%u,%u,%u)\n",
               t_block->bid.x, t_block->bid.y, t_block->bid.z, t_thread->tid.x, t_thread->tid.y, t_thread->tid.z,
               t_thread->lane, t_thread->warp, t_block->bdim.x, t_block->bdim.y, t_block->bdim.z, t_block->gdim.x,
               t_block->gdim.y, t_block->gdim.z);
}
