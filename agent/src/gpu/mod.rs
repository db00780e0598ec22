//! VRAM coordination: the NVML poller (its own thread), the arbiter's pure
//! ladder, the thermal guard, and the askers that ask ComfyUI and ollama to
//! free memory. Touches NVML, HTTP on loopback and thermal sysfs.

pub mod arbiter;
pub mod askers;
pub mod nvml;
pub mod thermal;
