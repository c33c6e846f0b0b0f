// bnext._C's CPU kernels: registered once, each a call through the op table
// of the CPU capability level loaded at import (csrc/cpu/op_table.h;
// bnext/_cpu_capability.py chooses the level and calls load_cpu_op_table).
// This file is compiled for the baseline instruction set, like the rest of
// _C: only the level libraries hold vector code.
#include <dlfcn.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>
#include <string>
#include <utility>

#include "cpu/op_table.h"
#include "cpu_dispatch.h"

namespace bnext::cpu {

namespace {

std::atomic<const OpTable*> current_table{nullptr};

const OpTable& table() {
  const OpTable* t = current_table.load(std::memory_order_acquire);
  TORCH_CHECK(
      t != nullptr,
      "bnext: no CPU kernels are loaded; `import bnext` loads those of this CPU's level");
  return *t;
}

// A CPU kernel that calls its entry of the current table; the signature is
// the table's (op_table.h), so it is written once.
template <auto Entry>
struct ViaTable;

template <typename R, typename... Args, R (*OpTable::*Entry)(Args...)>
struct ViaTable<Entry> {
  static R call(Args... args) {
    return (table().*Entry)(std::forward<Args>(args)...);
  }
};

}  // namespace

std::string load_cpu_op_table(const std::string& path) {
  // Never closed: the table and its functions must outlive every call.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "bnext: cannot load the CPU kernels ", path, ": ", dlerror());
  using Getter = const OpTable* (*)();
  const auto getter = reinterpret_cast<Getter>(dlsym(handle, "bnext_cpu_op_table"));
  TORCH_CHECK(getter != nullptr, "bnext: ", path, " has no bnext_cpu_op_table");
  const OpTable* t = getter();
  TORCH_CHECK(
      t != nullptr && t->version == kOpTableVersion, "bnext: ", path,
      " is from another bnext build (op table version ", t != nullptr ? t->version : -1,
      ", expected ", kOpTableVersion, "); rebuild bnext");
  current_table.store(t, std::memory_order_release);
  return t->level;
}

int cpu_forced_choice(int which) {
  TORCH_CHECK_VALUE(which == 0 || which == 1, "bnext: no CPU tuning choice ", which);
  return table().forced_choice(which);
}

int set_cpu_forced_choice(int which, int value) {
  const int previous = cpu_forced_choice(which);
  table().set_forced_choice(which, value);
  return previous;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  // CPUID leaf 7, sub-leaf 1, EAX bit 5; the OS's AVX-512 state support is
  // torch's part of the decision (it reports AVX512 only where it is on).
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) == 0) {
    return false;
  }
  return (eax & (1u << 5)) != 0;
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  m.impl("batch_norm_train", &ViaTable<&OpTable::batch_norm_train>::call);
  m.impl("batch_norm_eval", &ViaTable<&OpTable::batch_norm_eval>::call);
  m.impl("update_running_stats", &ViaTable<&OpTable::update_running_stats>::call);
  m.impl("batch_norm_backward", &ViaTable<&OpTable::batch_norm_backward>::call);
  m.impl("batch_norm_act_train", &ViaTable<&OpTable::batch_norm_act_train>::call);
  m.impl("batch_norm_act_eval", &ViaTable<&OpTable::batch_norm_act_eval>::call);
  m.impl("batch_norm_act_backward", &ViaTable<&OpTable::batch_norm_act_backward>::call);
  m.impl("batch_norm_moments", &ViaTable<&OpTable::batch_norm_moments>::call);
  m.impl("batch_norm_merge_moments", &ViaTable<&OpTable::batch_norm_merge_moments>::call);
  m.impl("batch_norm_elemt", &ViaTable<&OpTable::batch_norm_elemt>::call);
  m.impl("batch_norm_backward_reduce", &ViaTable<&OpTable::batch_norm_backward_reduce>::call);
  m.impl("batch_norm_backward_elemt", &ViaTable<&OpTable::batch_norm_backward_elemt>::call);
}

}  // namespace bnext::cpu
