//! Rollback targets as written in policy files: plain data and its validation, one file per
//! executor. `action` carries them out; nothing here does I/O.

pub mod alb;
