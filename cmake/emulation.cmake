# CPU emulation of the CUDA execution model (csrc/emulation), and its tests.
#
# include(cmake/emulation.cmake) from the top-level CMakeLists.txt (after
# project() and enable_testing()). Defines:
#   pyllm_emu                      static library (PUBLIC: include dir csrc/emulation,
#                                  compile definition PYLLM_EMULATED, Threads, C++20)
#   pyllm_emu_cu_as_cxx(<files>)   compile the given .cu files as C++ (for emulated builds)
#   tests (ctest -R emu_) unless PYLLM_EMU_TESTS is OFF; sanitizer tests unless
#   PYLLM_EMU_SANITIZER_TESTS is OFF.
include_guard(GLOBAL)

find_package(Threads REQUIRED)

# Paths are relative to this file, so it also works from a throwaway top-level project.
get_filename_component(PYLLM_EMU_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
set(PYLLM_EMU_DIR "${PYLLM_EMU_ROOT}/csrc/emulation")
set(PYLLM_EMU_TEST_DIR "${PYLLM_EMU_ROOT}/tests/cpp")

option(PYLLM_EMU_TESTS "Build the CUDA-emulation tests" ON)
set(_pyllm_emu_san_default OFF)
if(CMAKE_SYSTEM_NAME STREQUAL "Linux" AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  set(_pyllm_emu_san_default ON)
endif()
option(PYLLM_EMU_SANITIZER_TESTS "Build the ASan/UBSan CUDA-emulation tests" ${_pyllm_emu_san_default})

# .cu sources are plain C++ in emulated builds: compile them with the C++ compiler.
# g++ does not know the .cu extension, so also pass "-x c++" (CMake 3.25 does not).
function(pyllm_emu_cu_as_cxx)
  set_source_files_properties(${ARGN} PROPERTIES LANGUAGE CXX)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    set_property(SOURCE ${ARGN} APPEND PROPERTY COMPILE_OPTIONS -x c++)
  endif()
endfunction()

# pyllm_emu_add_runtime(<target> [FLAGS ...] [DEFS ...]): one build of the runtime.
function(pyllm_emu_add_runtime target)
  cmake_parse_arguments(A "" "" "FLAGS;DEFS" ${ARGN})
  add_library(${target} STATIC "${PYLLM_EMU_DIR}/emu.cpp")
  target_include_directories(${target} PUBLIC "${PYLLM_EMU_DIR}")
  target_compile_definitions(${target} PUBLIC PYLLM_EMULATED ${A_DEFS})
  target_compile_features(${target} PUBLIC cxx_std_20)
  target_link_libraries(${target} PUBLIC Threads::Threads ${CMAKE_DL_LIBS})
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # g++ < 13 cannot silence `#pragma unroll` warnings from inside emu.h.
    target_compile_options(${target} PUBLIC -Wno-unknown-pragmas)
  endif()
  if(A_FLAGS)
    target_compile_options(${target} PUBLIC ${A_FLAGS})
    target_link_options(${target} PUBLIC ${A_FLAGS})
  endif()
endfunction()

pyllm_emu_add_runtime(pyllm_emu)

if(NOT PYLLM_EMU_TESTS)
  return()
endif()

# pyllm_emu_add_test_exe(<name> <runtime target> <source.cu>)
function(pyllm_emu_add_test_exe name runtime src)
  pyllm_emu_cu_as_cxx("${PYLLM_EMU_TEST_DIR}/${src}")
  add_executable(${name} "${PYLLM_EMU_TEST_DIR}/${src}")
  target_include_directories(${name} PRIVATE "${PYLLM_EMU_TEST_DIR}" "${PYLLM_EMU_ROOT}/csrc/include")
  target_link_libraries(${name} PRIVATE ${runtime})
  # Export symbols so error messages can name kernels (dladdr).
  set_target_properties(${name} PROPERTIES ENABLE_EXPORTS ON)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${name} PRIVATE -Wall -Wextra)
  endif()
endfunction()

# (1) correct kernels, (2) planted bugs, fp16/bf16 conversions, tensor-core and cp.async
# instructions against the PTX ISA: plain build.
foreach(t correct bugs fp16 tensorcore)
  pyllm_emu_add_test_exe(emu_test_${t} pyllm_emu test_emu_${t}.cu)
  add_test(NAME emu_${t} COMMAND emu_test_${t})
  set_tests_properties(emu_${t} PROPERTIES TIMEOUT 120)
endforeach()

# The same tests against the portable ucontext context switch.
pyllm_emu_add_runtime(pyllm_emu_ucontext DEFS PYLLM_EMU_USE_UCONTEXT)
foreach(t correct bugs)
  pyllm_emu_add_test_exe(emu_test_${t}_ucontext pyllm_emu_ucontext test_emu_${t}.cu)
  add_test(NAME emu_${t}_ucontext COMMAND emu_test_${t}_ucontext)
  set_tests_properties(emu_${t}_ucontext PROPERTIES TIMEOUT 120)
endforeach()

if(NOT PYLLM_EMU_SANITIZER_TESTS)
  return()
endif()

# (3) Sanitizers.
set(_pyllm_emu_asan_ubsan -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g)
set(_pyllm_emu_ubsan -fsanitize=undefined,bounds -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g)
set(_pyllm_emu_asan_env "ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1"
                        "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")

pyllm_emu_add_runtime(pyllm_emu_asan_ubsan FLAGS ${_pyllm_emu_asan_ubsan})
pyllm_emu_add_runtime(pyllm_emu_ubsan FLAGS ${_pyllm_emu_ubsan})

# The correct and planted-bug tests must run clean under ASan+UBSan.
foreach(t correct bugs fp16 tensorcore)
  pyllm_emu_add_test_exe(emu_test_${t}_asan_ubsan pyllm_emu_asan_ubsan test_emu_${t}.cu)
  add_test(NAME emu_${t}_asan_ubsan COMMAND emu_test_${t}_asan_ubsan)
  set_tests_properties(emu_${t}_asan_ubsan PROPERTIES TIMEOUT 300 ENVIRONMENT "${_pyllm_emu_asan_env}"
                       FAIL_REGULAR_EXPRESSION "AddressSanitizer|runtime error:|LeakSanitizer")
endforeach()

# A kernel reading one past the end of a global buffer: ASan must report it.
pyllm_emu_add_test_exe(emu_test_asan_oob pyllm_emu_asan_ubsan test_emu_asan_oob.cu)
add_test(NAME emu_asan_catches_global_oob COMMAND emu_test_asan_oob)
set_tests_properties(emu_asan_catches_global_oob PROPERTIES TIMEOUT 120 ENVIRONMENT "${_pyllm_emu_asan_env}"
  PASS_REGULAR_EXPRESSION "AddressSanitizer: heap-buffer-overflow.*READ of size 4.*read_past_end_kernel")
add_test(NAME emu_asan_catches_dynamic_smem_oob COMMAND emu_test_asan_oob dynsmem)
set_tests_properties(emu_asan_catches_dynamic_smem_oob PROPERTIES TIMEOUT 120 ENVIRONMENT "${_pyllm_emu_asan_env}"
  PASS_REGULAR_EXPRESSION "AddressSanitizer: (use-after-poison|[a-z-]+-buffer-overflow).*READ of size 4.*dynamic_smem_overflow_kernel")

# A kernel overflowing a __shared__ array: UBSan (bounds) must report it.
pyllm_emu_add_test_exe(emu_test_ubsan_smem pyllm_emu_ubsan test_emu_ubsan_smem.cu)
add_test(NAME emu_ubsan_catches_shared_overflow COMMAND emu_test_ubsan_smem)
set_tests_properties(emu_ubsan_catches_shared_overflow PROPERTIES TIMEOUT 120 ENVIRONMENT "${_pyllm_emu_asan_env}"
  PASS_REGULAR_EXPRESSION "test_emu_ubsan_smem.cu:8:[0-9]+: runtime error: index 64 out of bounds for type 'float \\[64\\]'")
