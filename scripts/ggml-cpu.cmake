# llama.cpp (ggml) for a CPU level, never for the build machine's own CPU (-march=native): the Docker image is built
# on one machine and runs on others (an AI Core node may be older, or lack the AVX-512 and AMX of the build host).
# Both llama.cpp builds of the image read it, included before each CMake project() (CMAKE_PROJECT_INCLUDE_BEFORE):
# Shimmy's, through llama-cpp-sys-2, which passes CMAKE_* variables on to CMake but never sets GGML_NATIVE itself,
# and llama-cpp-python's (CMAKE_ARGS). The level is the TARGET_CPU environment variable (the build argument):
#   x86-64-v3  AVX, AVX2, FMA, F16C, BMI2 (Haswell, Zen 1 and later): ggml's own defaults once GGML_NATIVE is OFF
#   x86-64-v4  and AVX-512 (AVX512F), for nodes that all have it; never AMX
#   x86-64-v2  SSE4.2 only, for older CPUs (slower)
set(GGML_NATIVE OFF CACHE BOOL "not the build machine's CPU" FORCE)
set(_level "$ENV{TARGET_CPU}")
if(_level STREQUAL "x86-64-v2")
  foreach(_isa AVX AVX2 FMA F16C BMI2)
    set(GGML_${_isa} OFF CACHE BOOL "TARGET_CPU=x86-64-v2" FORCE)
  endforeach()
elseif(_level STREQUAL "x86-64-v4")
  set(GGML_AVX512 ON CACHE BOOL "TARGET_CPU=x86-64-v4" FORCE)
elseif(NOT _level STREQUAL "x86-64-v3")
  message(FATAL_ERROR "TARGET_CPU='${_level}': expected x86-64-v3 (the default), x86-64-v4 or x86-64-v2")
endif()
