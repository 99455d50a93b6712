//! The C ABI for native IDEs: connect, call with JSON text, free.
//!
//! Every string crosses as NUL-terminated UTF-8. A call returns the JSON-RPC
//! response object as text, `{"result": ...}` or `{"error": {...}}`, which
//! the caller frees with [`mariesync_string_free`].

use std::ffi::{CStr, CString, c_char};
use std::path::Path;

use serde_json::{Value, json};

use crate::{Client, ClientError, HomePaths};

/// Connects to the daemon of `home` (NULL: `MARIESYNC_HOME` or the platform
/// directories). Returns NULL if no daemon answers.
///
/// # Safety
/// `home` is NULL or a valid NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mariesync_client_connect(home: *const c_char) -> *mut Client {
    let home = if home.is_null() {
        None
    } else {
        // SAFETY: the caller promises a valid C string.
        match unsafe { CStr::from_ptr(home) }.to_str() {
            Ok(s) => Some(s.to_owned()),
            Err(_) => return std::ptr::null_mut(),
        }
    };
    let Ok(paths) = HomePaths::resolve(home.as_deref().map(Path::new)) else {
        return std::ptr::null_mut();
    };
    match Client::connect(&paths) {
        Ok(client) => Box::into_raw(Box::new(client)),
        Err(_) => std::ptr::null_mut(),
    }
}

/// Calls `method` with `params_json` (NULL means `{}`); returns the response
/// as JSON text. Never returns NULL.
///
/// # Safety
/// `client` came from [`mariesync_client_connect`]; the strings are valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mariesync_client_call(
    client: *mut Client,
    method: *const c_char,
    params_json: *const c_char,
) -> *mut c_char {
    let reply = (|| {
        if client.is_null() || method.is_null() {
            return json!({"error": {"code": -32600, "message": "null client or method"}});
        }
        // SAFETY: checked for NULL above; validity is the caller's promise.
        let client = unsafe { &mut *client };
        let Ok(method) = unsafe { CStr::from_ptr(method) }.to_str() else {
            return json!({"error": {"code": -32600, "message": "method is not UTF-8"}});
        };
        let params: Value = if params_json.is_null() {
            json!({})
        } else {
            match unsafe { CStr::from_ptr(params_json) }
                .to_str()
                .ok()
                .and_then(|s| serde_json::from_str(s).ok())
            {
                Some(v) => v,
                None => {
                    return json!({"error": {"code": -32700, "message": "params are not valid JSON"}});
                }
            }
        };
        match client.call(method, params) {
            Ok(result) => json!({ "result": result }),
            Err(ClientError::Rpc(error)) => json!({ "error": error }),
            Err(other) => json!({"error": {"code": -32603, "message": other.to_string()}}),
        }
    })();
    CString::new(reply.to_string())
        .expect("JSON text has no NUL")
        .into_raw()
}

/// Frees a string returned by this library.
///
/// # Safety
/// `s` is NULL or came from this library and is freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mariesync_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: it was made by CString::into_raw in this library.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Closes the connection.
///
/// # Safety
/// `client` is NULL or came from [`mariesync_client_connect`], freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mariesync_client_free(client: *mut Client) {
    if !client.is_null() {
        // SAFETY: it was made by Box::into_raw in mariesync_client_connect.
        drop(unsafe { Box::from_raw(client) });
    }
}
