//! Errors of operations, each with the protocol error class it maps to.

use banger_proto::ErrorCode;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

pub type OpResult<T> = Result<T, OpError>;

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParams, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn registry(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Registry, message)
    }
    pub fn bad_content(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadContent, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// A failed write under `dir`: a full filesystem is named with its fix
    /// (whatever tool reported it), anything else is internal.
    pub fn writing(message: impl Into<String>, dir: &std::path::Path) -> Self {
        let message = message.into();
        if message.contains("No space left on device") || message.contains("os error 28") {
            return Self::invalid(format!(
                "the filesystem holding {} is full; free space (or run `banger image cache \
                 prune`) and try again ({message})",
                dir.display()
            ));
        }
        Self::internal(message)
    }
}

impl From<banger_proto::rpc::RequestError> for OpError {
    fn from(e: banger_proto::rpc::RequestError) -> Self {
        use banger_proto::rpc::RequestError;
        let code = match e {
            RequestError::InvalidParams(_) => ErrorCode::InvalidParams,
            RequestError::Malformed(_) | RequestError::UnknownMethod(_) => ErrorCode::BadRequest,
        };
        OpError::new(code, e.to_string())
    }
}

impl From<anyhow::Error> for OpError {
    fn from(e: anyhow::Error) -> Self {
        // Keep the whole context chain: it is what tells the user what failed.
        OpError::internal(format!("{e:#}"))
    }
}

impl From<std::io::Error> for OpError {
    fn from(e: std::io::Error) -> Self {
        OpError::internal(e.to_string())
    }
}

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        OpError::internal(format!("state database: {e}"))
    }
}
