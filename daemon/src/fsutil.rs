//! Small filesystem helpers shared by the replica format and the control plane.
