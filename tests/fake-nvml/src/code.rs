//! `nvmlReturn_t` codes (values from nvml.h) and their `nvmlErrorString` texts.

use std::ffi::CStr;

pub const NVML_SUCCESS: u32 = 0;
pub const NVML_ERROR_UNINITIALIZED: u32 = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: u32 = 2;
pub const NVML_ERROR_NOT_SUPPORTED: u32 = 3;
pub const NVML_ERROR_NO_PERMISSION: u32 = 4;
pub const NVML_ERROR_ALREADY_INITIALIZED: u32 = 5;
pub const NVML_ERROR_NOT_FOUND: u32 = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: u32 = 7;
pub const NVML_ERROR_INSUFFICIENT_POWER: u32 = 8;
pub const NVML_ERROR_DRIVER_NOT_LOADED: u32 = 9;
pub const NVML_ERROR_TIMEOUT: u32 = 10;
pub const NVML_ERROR_IRQ_ISSUE: u32 = 11;
pub const NVML_ERROR_LIBRARY_NOT_FOUND: u32 = 12;
pub const NVML_ERROR_FUNCTION_NOT_FOUND: u32 = 13;
pub const NVML_ERROR_CORRUPTED_INFOROM: u32 = 14;
pub const NVML_ERROR_GPU_IS_LOST: u32 = 15;
pub const NVML_ERROR_RESET_REQUIRED: u32 = 16;
pub const NVML_ERROR_OPERATING_SYSTEM: u32 = 17;
pub const NVML_ERROR_LIB_RM_VERSION_MISMATCH: u32 = 18;
pub const NVML_ERROR_IN_USE: u32 = 19;
pub const NVML_ERROR_MEMORY: u32 = 20;
pub const NVML_ERROR_NO_DATA: u32 = 21;
pub const NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: u32 = 22;
pub const NVML_ERROR_INSUFFICIENT_RESOURCES: u32 = 23;
pub const NVML_ERROR_FREQ_NOT_SUPPORTED: u32 = 24;
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: u32 = 25;
pub const NVML_ERROR_DEPRECATED: u32 = 26;
pub const NVML_ERROR_NOT_READY: u32 = 27;
pub const NVML_ERROR_GPU_NOT_FOUND: u32 = 28;
pub const NVML_ERROR_INVALID_STATE: u32 = 29;
pub const NVML_ERROR_UNKNOWN: u32 = 999;

/// What `nvmlErrorString(code)` returns.
pub fn error_string(code: u32) -> &'static CStr {
    match code {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_NO_PERMISSION => c"Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED => c"Already Initialized",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER => c"Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_TIMEOUT => c"Timeout",
        NVML_ERROR_IRQ_ISSUE => c"Interrupt request issue",
        NVML_ERROR_LIBRARY_NOT_FOUND => c"NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND => c"Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM => c"Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        NVML_ERROR_RESET_REQUIRED => c"GPU requires restart",
        NVML_ERROR_OPERATING_SYSTEM => c"The operating system has blocked the request.",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH => c"RM has detected an NVML/RM version mismatch.",
        NVML_ERROR_IN_USE => c"In use by another client",
        NVML_ERROR_MEMORY => c"Insufficient Memory",
        NVML_ERROR_NO_DATA => c"No data",
        NVML_ERROR_VGPU_ECC_NOT_SUPPORTED => {
            c"The requested vgpu operation is not available on target device, because ECC is enabled"
        }
        NVML_ERROR_INSUFFICIENT_RESOURCES => c"Insufficient resources",
        NVML_ERROR_FREQ_NOT_SUPPORTED => c"Frequency not supported",
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        NVML_ERROR_DEPRECATED => c"Deprecated",
        NVML_ERROR_NOT_READY => c"Not ready",
        NVML_ERROR_GPU_NOT_FOUND => c"GPU not found",
        NVML_ERROR_INVALID_STATE => c"Invalid state",
        _ => c"Unknown Error",
    }
}
