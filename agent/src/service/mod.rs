//! Running as a service: the one event loop (`daemon`), the control socket,
//! sd_notify, desktop notifications. Wires the other folders together.

pub mod agent;
mod agent_desktop;
mod agent_gamemode;
mod agent_gpu;
mod agent_views;
pub mod control;
pub mod daemon;
pub mod desktop_notify;
pub mod gamemode_bus;
mod inotify_events;
pub mod notify;
mod ticker;
