//! What a policy reverts, as plain data: the schema of each executor's target in the policy
//! file, with the checks serde cannot make. The executors in `action/` read these; nothing
//! here does I/O.

pub mod alb;
pub mod kube_check;
pub mod kubernetes;
