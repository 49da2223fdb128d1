//! The Connect protocol (unary): what Iris's Python clients and controllers speak.
//!
//! A request is `POST /<service>/<Method>` over HTTP/1.1 or 2 with `Content-Type:
//! application/proto` or `application/json` (proto3 JSON names), optionally gzip-compressed
//! (`Content-Encoding: gzip`); the response is the bare message with the same content type,
//! or an error as `application/json` `{"code": "...", "message": "..."}` with the HTTP status
//! of the code.

mod client;
mod codec;
mod server;

pub use client::{ConnectClient, ConnectError};
pub use codec::{Codec, Generation};
pub use server::{CallCode, ConnectService, MAX_BODY, ReadTimeout, connect_router, error_response, unary, unary_in};

use tonic::Code;

/// The Connect name of a gRPC code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status Connect uses for a code.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::PermissionDenied => 403,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::Unauthenticated => 401,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

/// The gRPC code of a Connect code name (unknown names are `unknown`).
pub fn code_from_name(name: &str) -> Code {
    [
        Code::Cancelled,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ]
    .into_iter()
    .find(|c| code_name(*c) == name)
    .unwrap_or(Code::Unknown)
}
