// switchyard._core: the Python binding over the C++ trainer-side client
// (trainer/moe_session.h). python/switchyard/torch wraps it in nn.Modules;
// docs/pytorch.md documents both. Arrays cross as numpy arrays (torch
// tensors' .numpy() and torch.from_numpy, no copy on the torch side); the
// GIL is released while a call waits on the cluster (and while a session
// is deleted: it leaves the cluster). Every failure raises SwitchyardError
// with Switchyard's status text.
#include <glog/logging.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/config.h"
#include "common/model_shape.h"
#include "common/status.h"
#include "common/tensor.h"
#include "trainer/moe_session.h"
#include "transport/control/auth.h"

namespace py = pybind11;

namespace switchyard {
namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32Array =
    py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// Set in PYBIND11_MODULE.
PyObject* g_error = nullptr;

[[noreturn]] void Raise(const Status& s) {
  PyErr_SetString(g_error, s.ToString().c_str());
  throw py::error_already_set();
}

template <typename T>
T ValueOrRaise(StatusOr<T> v) {
  if (!v.ok()) Raise(v.status());
  return std::move(v).value();
}

// A (rows, cols) fp32 copy of a 2-D array.
Tensor ToTensor(const F32Array& a, const char* what) {
  if (a.ndim() != 2) {
    Raise(InvalidArgumentError(std::string(what) + " has " +
                               std::to_string(a.ndim()) +
                               " dimensions, not 2 (tokens, d_model)"));
  }
  Tensor t = ValueOrRaise(Tensor::Zeros(DType::kF32, {a.shape(0), a.shape(1)}));
  std::memcpy(t.f32(), a.data(), a.size() * sizeof(float));
  return t;
}

F32Array ToArray(const Tensor& t) {
  F32Array a({t.dim(0), t.dim(1)});
  std::memcpy(a.mutable_data(), t.f32(), t.num_elements() * sizeof(float));
  return a;
}

// The route of (T, k) arrays.
trainer::RouterState<float> ToRoute(const trainer::MoeSession& s,
                                    const F32Array& x, const I32Array& experts,
                                    const F32Array& gates,
                                    const U8Array& kept) {
  trainer::RouterState<float> route;
  route.tokens = x.ndim() > 0 ? static_cast<int>(x.shape(0)) : 0;
  route.experts = s.config().model().num_experts();
  route.k = experts.ndim() == 2 ? static_cast<int>(experts.shape(1)) : 0;
  for (const auto* a : {static_cast<const py::array*>(&experts),
                        static_cast<const py::array*>(&gates),
                        static_cast<const py::array*>(&kept)}) {
    if (a->ndim() != 2 || a->shape(0) != route.tokens ||
        a->shape(1) != route.k) {
      Raise(InvalidArgumentError(
          "experts, gates and kept must all be (tokens, k) = (" +
          std::to_string(route.tokens) + ", " + std::to_string(route.k) + ")"));
    }
  }
  route.expert.assign(experts.data(), experts.data() + experts.size());
  route.gate.assign(gates.data(), gates.data() + gates.size());
  route.kept.assign(kept.data(), kept.data() + kept.size());
  return route;
}

// Deletes a session without the GIL: leaving the cluster waits on the
// network, and other Python threads should run meanwhile.
struct DeleteWithoutGil {
  void operator()(trainer::MoeSession* session) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      delete session;
    } else {
      delete session;
    }
  }
};
using SessionHolder = std::unique_ptr<trainer::MoeSession, DeleteWithoutGil>;

// `call()` with the GIL released (it waits on the cluster).
template <typename F>
auto WithoutGil(F&& call) {
  std::optional<decltype(call())> result;
  {
    py::gil_scoped_release release;
    result.emplace(call());
  }
  return std::move(*result);
}

// x and its route as C++ values, then call(x, route) without the GIL; y.
template <typename F>
F32Array CallWithRoute(const trainer::MoeSession& s, const F32Array& x,
                       const I32Array& experts, const F32Array& gates,
                       const U8Array& kept, F&& call) {
  const Tensor in = ToTensor(x, "x");
  const trainer::RouterState<float> route = ToRoute(s, x, experts, gates, kept);
  return ToArray(ValueOrRaise(WithoutGil([&] { return call(in, route); })));
}

// The configuration as `switchyard` commands load it, with what `up
// --run-dir` wrote: the coordinator's address and the secret.
trainer::MoeSessionOptions Options(const std::string& config_path,
                                   const std::vector<std::string>& overrides,
                                   const std::string& run_dir) {
  std::vector<std::string> all = overrides;
  if (!run_dir.empty()) {
    std::ifstream in(run_dir + "/coordinator.addr");
    std::string address;
    if (!(in >> address)) {
      Raise(NotFoundError("no coordinator address in " + run_dir +
                          "/coordinator.addr (is the cluster up?)"));
    }
    all.insert(all.begin(), "cluster.coordinator_address=" + address);
    all.insert(all.begin(), "cluster.secret_file=" + run_dir + "/secret");
    all.insert(all.begin(), "cluster.state_dir=" + run_dir);
  }
  LoadedConfig loaded = ValueOrRaise(LoadConfig(config_path, all));
  trainer::MoeSessionOptions options;
  options.config = loaded.config;
  options.secret = ValueOrRaise(
      control::ReadSecretFile(options.config.cluster().secret_file()));
  return options;
}

}  // namespace
}  // namespace switchyard

PYBIND11_MODULE(_core, m) {
  using switchyard::trainer::MoeSession;
  namespace sy = switchyard;
  m.doc() = "Switchyard's trainer-side client (trainer/moe_session.h)";
  if (!google::IsGoogleLoggingInitialized()) {
    google::InitGoogleLogging("switchyard");
    FLAGS_logtostderr = true;
  }
  static py::exception<std::runtime_error> error(m, "SwitchyardError",
                                                 PyExc_RuntimeError);
  sy::g_error = error.ptr();

  py::class_<MoeSession, sy::SessionHolder>(m, "Session")
      .def(py::init([](const std::string& config_path, int rank,
                       const std::string& run_dir,
                       const std::vector<std::string>& overrides,
                       const std::string& name) {
             sy::trainer::MoeSessionOptions options =
                 sy::Options(config_path, overrides, run_dir);
             options.rank = rank;
             options.name = name;
             return sy::SessionHolder(sy::ValueOrRaise(sy::WithoutGil([&] {
                                        return MoeSession::Connect(
                                            std::move(options));
                                      })).release());
           }),
           py::arg("config_path"), py::arg("rank"), py::arg("run_dir") = "",
           py::arg("overrides") = std::vector<std::string>(),
           py::arg("name") = "",
           "Joins the cluster as trainer `rank` and waits until every expert "
           "shard is reachable.")
      .def_property_readonly("step", &MoeSession::step)
      .def_property_readonly("epoch", &MoeSession::epoch)
      .def_property_readonly(
          "d_model",
          [](const MoeSession& s) { return s.config().model().d_model(); })
      .def_property_readonly(
          "num_experts",
          [](const MoeSession& s) { return s.config().model().num_experts(); })
      .def_property_readonly(
          "top_k",
          [](const MoeSession& s) { return s.config().model().top_k(); })
      .def_property_readonly("num_moe_layers",
                             [](const MoeSession& s) {
                               return sy::NumMoeLayers(s.config().model());
                             })
      .def_property_readonly("micro_batches",
                             [](const MoeSession& s) {
                               return s.config().training().micro_batches();
                             })
      .def_property_readonly("capacity_factor",
                             [](const MoeSession& s) {
                               return s.config().model().capacity_factor();
                             })
      .def_property_readonly(
          "eval_capacity_factor",
          [](const MoeSession& s) {
            return s.config().training().eval_capacity_factor();
          })
      .def_property_readonly("aux_loss_alpha",
                             [](const MoeSession& s) {
                               return s.config().model().aux_loss_alpha();
                             })
      .def_property_readonly("router_z_loss",
                             [](const MoeSession& s) {
                               return s.config().model().router_z_loss();
                             })
      .def_property_readonly("router_jitter",
                             [](const MoeSession& s) {
                               return s.config().model().router_jitter();
                             })
      .def(
          "forward",
          [](MoeSession& s, int layer, int micro_batch, const sy::F32Array& x,
             const sy::I32Array& experts, const sy::F32Array& gates,
             const sy::U8Array& kept) {
            return sy::CallWithRoute(
                s, x, experts, gates, kept, [&](const auto& in, const auto& r) {
                  return s.Forward(layer, micro_batch, in, r);
                });
          },
          py::arg("layer"), py::arg("micro_batch"), py::arg("x"),
          py::arg("experts"), py::arg("gates"), py::arg("kept"))
      .def(
          "evaluate",
          [](MoeSession& s, int layer, const sy::F32Array& x,
             const sy::I32Array& experts, const sy::F32Array& gates,
             const sy::U8Array& kept) {
            return sy::CallWithRoute(s, x, experts, gates, kept,
                                     [&](const auto& in, const auto& r) {
                                       return s.Evaluate(layer, in, r);
                                     });
          },
          py::arg("layer"), py::arg("x"), py::arg("experts"), py::arg("gates"),
          py::arg("kept"))
      .def(
          "backward",
          [](MoeSession& s, int layer, int micro_batch,
             const sy::F32Array& dy) {
            sy::Tensor grad = sy::ToTensor(dy, "dy");
            sy::Tensor dx;
            std::vector<float> d_gate;
            const sy::Status st = sy::WithoutGil([&] {
              return s.Backward(layer, micro_batch, grad, &dx, &d_gate);
            });
            if (!st.ok()) sy::Raise(st);
            const int64_t tokens = dx.dim(0);
            const int64_t k = tokens > 0 ? d_gate.size() / tokens : 0;
            sy::F32Array g({tokens, k});
            std::memcpy(g.mutable_data(), d_gate.data(),
                        d_gate.size() * sizeof(float));
            return py::make_tuple(sy::ToArray(dx), g);
          },
          py::arg("layer"), py::arg("micro_batch"), py::arg("dy"))
      .def("step_done",
           [](MoeSession& s) {
             const sy::Status st = sy::WithoutGil([&] { return s.StepDone(); });
             if (!st.ok()) sy::Raise(st);
           })
      .def("close", [](MoeSession& s) {
        const sy::Status st = sy::WithoutGil([&] { return s.Close(); });
        if (!st.ok()) sy::Raise(st);
      });
}
