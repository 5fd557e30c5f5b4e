//! Guest kernel and root image building (issues #5 and #8).
//!
//! Not built yet: the process backend runs function code from a directory on the host.
