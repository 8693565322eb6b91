//! What the C++ shim's parts (`csrc/`) share on the Rust side: the error slot every call takes.

// FFI: the shim's messages are strdup'ed C strings, freed here once.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};

unsafe extern "C" {
    fn darkroom_free_error(error: *mut c_char);
}

/// Runs one shim call with an error slot; a set slot comes back as its message.
pub(crate) fn call<R>(f: impl FnOnce(*mut *mut c_char) -> R) -> Result<R, String> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let value = f(&mut error);
    if error.is_null() {
        return Ok(value);
    }
    // SAFETY: the shim set `error` to a NUL-terminated string from strdup.
    Err(unsafe { take_string(error) })
}

/// Copies a string the shim allocated and frees it.
///
/// # Safety
/// `text` is a non-null, NUL-terminated string from the shim's `strdup`, not used afterwards.
pub(crate) unsafe fn take_string(text: *mut c_char) -> String {
    // SAFETY: as the caller promises.
    unsafe {
        let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
        darkroom_free_error(text);
        owned
    }
}
