// The in-process data plane: a DataPlane whose peers are other in-process
// data planes of the same process, reached by address ("inproc:N") without
// any copy or serialisation. Requests go straight to the peer's handler;
// the DataPlane contract holds as it does for UCX (every callback runs
// once, by its deadline; an unknown peer is UNAVAILABLE).
//
// It runs the single-process reference (`switchyard train --reference`):
// the same trainer and worker code as a distributed run, without a network,
// so that the two can be compared bit for bit.
//
// Thread-safety: all methods are thread-safe.
#ifndef SWITCHYARD_TRANSPORT_LOCAL_IN_PROCESS_DATA_PLANE_H_
#define SWITCHYARD_TRANSPORT_LOCAL_IN_PROCESS_DATA_PLANE_H_

#include <memory>

#include "transport/data_plane.h"

namespace switchyard::transport {

std::unique_ptr<DataPlane> NewInProcessDataPlane();

}  // namespace switchyard::transport

#endif  // SWITCHYARD_TRANSPORT_LOCAL_IN_PROCESS_DATA_PLANE_H_
