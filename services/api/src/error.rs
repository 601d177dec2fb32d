//! The api's errors: the shared [`ApiError`], and how store errors map to
//! gRPC codes.

use tonic::Code;
pub use virtufin_common::ApiError;
use virtufin_store::StoreError;

/// Maps a store failure to its gRPC code.
pub fn store(e: StoreError) -> ApiError {
    let code = match &e {
        StoreError::EtagMismatch { .. } => Code::Aborted,
        StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::Backend(_) => Code::Internal,
        StoreError::Unsupported(_) => Code::FailedPrecondition,
    };
    ApiError::new(code, e.to_string())
}

/// `?`-friendly conversion of store results.
pub trait StoreResultExt<T> {
    fn api(self) -> Result<T, ApiError>;
}

impl<T> StoreResultExt<T> for Result<T, StoreError> {
    fn api(self) -> Result<T, ApiError> {
        self.map_err(store)
    }
}
