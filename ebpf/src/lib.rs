//! Library target so the agent can name this crate as a build dependency;
//! the programs themselves are in `main.rs`.
#![no_std]
