//! The guest's PID 1 (issue #5): mounts, loopback, the Runtime API on 127.0.0.1:9001 (from
//! `rapid-api`) and the vsock link to the host agent.
//!
//! Not built yet.
