// This level library's op table (op_table.h). BNEXT_CPU_LEVEL names the
// level it was compiled for (setup.py passes it with the level's flags).
#include "op_table.h"

#include "cache_policy.h"

#ifndef BNEXT_CPU_LEVEL
#error "setup.py compiles the CPU kernels with -DBNEXT_CPU_LEVEL=<level>"
#endif
#define BNEXT_STRINGIFY2(x) #x
#define BNEXT_STRINGIFY(x) BNEXT_STRINGIFY2(x)

extern "C" const bnext::cpu::OpTable* bnext_cpu_op_table() {
  static const bnext::cpu::OpTable table = [] {
    bnext::cpu::OpTable t{};
    t.version = bnext::cpu::kOpTableVersion;
    t.level = BNEXT_STRINGIFY(BNEXT_CPU_LEVEL);
    bnext::cpu::fill_plain_ops(t);
    bnext::cpu::fill_fused_ops(t);
    bnext::cpu::fill_phase_ops(t);
    t.forced_choice = [](int which) {
      return bnext::cpu::forced_choice(static_cast<bnext::cpu::Tuning>(which));
    };
    t.set_forced_choice = [](int which, int value) {
      bnext::cpu::set_forced_choice(static_cast<bnext::cpu::Tuning>(which), value);
    };
    return t;
  }();
  return &table;
}
