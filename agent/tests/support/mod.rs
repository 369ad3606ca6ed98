//! Helpers for the BPF program tests: frames built and checked by hand,
//! a BPF_PROG_TEST_RUN wrapper, and a simulated node in its own netns.

pub mod node;
pub mod packet;
pub mod testrun;
