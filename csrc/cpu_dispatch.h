// What bnext/_cpu_capability.py needs from bnext._C (module.cpp binds it).
#pragma once
#include <string>

namespace bnext::cpu {

// Loads the level library at `path` and routes every CPU op through its op
// table from now on; returns the level's name. Throws c10::Error when the
// library cannot be loaded or comes from another build.
std::string load_cpu_op_table(const std::string& path);

// The loaded level's forced memory-traffic choice `which` (0 streaming
// stores, 1 resident walk): -1 automatic, 0 off, 1 on. Setting returns the
// previous value. Throws c10::Error for an unknown `which`.
int cpu_forced_choice(int which);
int set_cpu_forced_choice(int which, int value);

// Whether the CPU has AVX512_BF16 (CPUID), which torch's capability levels
// do not tell.
bool cpu_has_avx512_bf16();

}  // namespace bnext::cpu
