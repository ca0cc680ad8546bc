// pybind11 bindings of the lrfree extension (GPU or host target; see kernels.cuh).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>

#include "dispatch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrfree fused optimizer passes (multi-tensor, deterministic reductions)";
  m.def("launch", &lrfree::launch, pybind11::arg("name"), pybind11::arg("grid"), pybind11::arg("pointers"),
        pybind11::arg("flags"), pybind11::arg("dtype"), pybind11::arg("state_dtype"), pybind11::arg("block"),
        pybind11::arg("stream"), pybind11::arg("device"),
        "Run kernel `name` (its Triton twin's module.kernel) over `grid` programs.");
  m.def("kernels", &lrfree::kernel_names, "The kernels this build provides.");
  m.def(
      "salts",
      [] {
        return std::map<std::string, uint32_t>{{"exp_avg", lrfree::kSaltExpAvg},
                                               {"exp_avg_sq", lrfree::kSaltExpAvgSq},
                                               {"max_exp_avg_sq", lrfree::kSaltMaxExpAvgSq},
                                               {"s", lrfree::kSaltS}};
      },
      "The state keys' dither salts the kernels are compiled with (lrfree.precision.salt).");
  m.def("target", &lrfree::target, "'cuda' or 'host'.");
}
