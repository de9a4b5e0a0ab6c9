// Runtime SIMD dispatch: one kernel table per compiled target, the active one chosen at first
// use (best supported, capped by NORMLAB_CPU_TARGET) and switchable with set_cpu_target().
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch/kernel_table.hpp"
#include "normlab/runtime.hpp"
#include "simd/cpu_features.hpp"

namespace normlab {

#define NL_DECLARE_REGISTER(file) void register_##file(KernelTable&);
#define NL_DECLARE_TARGET(ns) \
  namespace ns {              \
  NL_KERNEL_FILES(NL_DECLARE_REGISTER)     \
  }

#define NL_CALL_REGISTER(file) register_##file(table);

#define NL_TARGET_FILLER(ns)                         \
  NL_DECLARE_TARGET(ns)                              \
  namespace ns {                                     \
  static void fill(KernelTable& table) {             \
    table.target = #ns;                              \
    NL_KERNEL_FILES(NL_CALL_REGISTER)                \
  }                                                  \
  }

NL_TARGET_FILLER(baseline)
#ifdef NL_HAVE_TARGET_AVX2
NL_TARGET_FILLER(avx2)
#endif
#ifdef NL_HAVE_TARGET_AVX512
NL_TARGET_FILLER(avx512)
#endif
#ifdef NL_HAVE_TARGET_AVX512BF16
NL_TARGET_FILLER(avx512bf16)
#endif
#ifdef NL_HAVE_TARGET_NEON
NL_TARGET_FILLER(neon)
#endif

namespace {

struct TargetEntry {
  const char* name;
  void (*fill)(KernelTable&);
};

// Worst to best.
const TargetEntry kTargets[] = {
    {"baseline", &baseline::fill},
#ifdef NL_HAVE_TARGET_AVX2
    {"avx2", &avx2::fill},
#endif
#ifdef NL_HAVE_TARGET_AVX512
    {"avx512", &avx512::fill},
#endif
#ifdef NL_HAVE_TARGET_AVX512BF16
    {"avx512bf16", &avx512bf16::fill},
#endif
#ifdef NL_HAVE_TARGET_NEON
    {"neon", &neon::fill},
#endif
};
constexpr int kNumTargets = sizeof(kTargets) / sizeof(kTargets[0]);

struct Dispatch {
  KernelTable tables[kNumTargets];
  bool supported[kNumTargets];
  std::atomic<int> active{0};
  std::string rejected_env;

  Dispatch() {
    int best = 0;
    for (int i = 0; i < kNumTargets; ++i) {
      kTargets[i].fill(tables[i]);
      supported[i] = cpu_supports_target(kTargets[i].name);
      if (supported[i]) best = i;
    }
    if (const char* env = std::getenv("NORMLAB_CPU_TARGET"); env && *env) {
      const int cap = find(env);
      if (cap < 0) {
        rejected_env = env;
      } else if (cap < best) {
        best = cap;
        while (!supported[best]) --best;
      }
    }
    active.store(best);
  }

  static int find(const std::string& name) {
    for (int i = 0; i < kNumTargets; ++i)
      if (name == kTargets[i].name) return i;
    return -1;
  }
};

Dispatch& dispatch() {
  static Dispatch instance;
  return instance;
}

}  // namespace

const KernelTable& active_kernels() {
  Dispatch& d = dispatch();
  return d.tables[d.active.load(std::memory_order_relaxed)];
}

std::vector<std::string> compiled_cpu_targets() {
  std::vector<std::string> names;
  for (const TargetEntry& t : kTargets) names.emplace_back(t.name);
  return names;
}

std::vector<std::string> supported_cpu_targets() {
  Dispatch& d = dispatch();
  std::vector<std::string> names;
  for (int i = 0; i < kNumTargets; ++i)
    if (d.supported[i]) names.emplace_back(kTargets[i].name);
  return names;
}

std::string get_cpu_target() { return active_kernels().target; }

void set_cpu_target(const std::string& name) {
  Dispatch& d = dispatch();
  const int i = Dispatch::find(name);
  if (i < 0 || !d.supported[i]) {
    std::string choices;
    for (const std::string& s : supported_cpu_targets()) choices += (choices.empty() ? "" : ", ") + s;
    throw std::invalid_argument("cpu target '" + name + "' is " +
                                (i < 0 ? "not compiled into this build" : "not supported by this CPU") +
                                "; expected one of: " + choices);
  }
  d.active.store(i);
}

std::string rejected_env_cpu_target() { return dispatch().rejected_env; }

}  // namespace normlab
