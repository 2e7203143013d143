// Benchmarks' data-plane options: a fixed cluster secret that the
// benchmark's own processes share (they authenticate as a cluster's do).
#ifndef SWITCHYARD_BENCH_BENCH_DATA_PLANE_H_
#define SWITCHYARD_BENCH_BENCH_DATA_PLANE_H_

#include "transport/data_plane.h"

namespace switchyard {

inline transport::DataPlaneOptions BenchDataPlaneOptions() {
  transport::DataPlaneOptions options;
  options.secret = "switchyard-bench-cluster-secret-0123456789";
  return options;
}

}  // namespace switchyard

#endif  // SWITCHYARD_BENCH_BENCH_DATA_PLANE_H_
