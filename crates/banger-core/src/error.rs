//! Errors of operations, each with the protocol error class it maps to.

use banger_proto::ErrorCode;

use crate::services::vms::error::VmError;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
}

pub type OpResult<T> = Result<T, OpError>;

/// Declares a module's error for parsers and checkers whose message is the
/// whole story (it names the offending field, path or byte): its own type,
/// so the wire class it maps to is decided once, below, not at each caller.
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("{0}")]
        pub struct $name(pub String);

        impl From<String> for $name {
            fn from(message: String) -> Self {
                $name(message)
            }
        }

        impl From<&str> for $name {
            fn from(message: &str) -> Self {
                $name(message.to_string())
            }
        }

        /// Inside a module that still words its errors as text, `?` works.
        impl From<$name> for String {
            fn from(e: $name) -> String {
                e.0
            }
        }

        /// The message, for callers that add context to it.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
    };
}
pub(crate) use message_error;

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
    pub fn writing(message: impl std::fmt::Display, dir: &std::path::Path) -> Self {
        let message = message.to_string();
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

/// Each module's error, mapped to its wire class here and only here.
macro_rules! wire_class {
    ($($error:ty => $code:ident),* $(,)?) => {
        $(
            impl From<$error> for OpError {
                fn from(e: $error) -> Self {
                    OpError::new(ErrorCode::$code, e.to_string())
                }
            }
        )*
    };
}

wire_class! {
    crate::vm::name::InvalidName => InvalidParams,
    crate::vm::sizing::SizeError => InvalidParams,
    crate::vm::root_mode::Unsupported => InvalidParams,
    crate::workspace::WorkspaceError => InvalidParams,
    crate::vm::keys::KeyError => Internal,
    crate::vm::disk::DiskError => Internal,
    crate::vm::agent_client::AgentError => Internal,
    crate::oci::reference::BadReference => InvalidParams,
    crate::oci::ContentError => BadContent,
    crate::rootfs::UnsafePath => BadContent,
    crate::kernel::KernelError => BadContent,
    crate::network::NetError => Internal,
    crate::agent_bin::AgentBinError => Internal,
}

impl From<crate::vm::vmm::VmmError> for OpError {
    fn from(e: crate::vm::vmm::VmmError) -> Self {
        use crate::vm::vmm::VmmError as E;
        let code = match &e {
            // What the user chose (a path, an accelerator) cannot work.
            E::Spec(_) | E::UnknownAccel(_) | E::NotInstalled(_) => ErrorCode::InvalidParams,
            E::Api(_) | E::Connect { .. } | E::Refused(_) => ErrorCode::Internal,
        };
        OpError::new(code, e.to_string())
    }
}

impl From<VmError> for OpError {
    fn from(e: VmError) -> Self {
        let code = match &e {
            VmError::NotFound { .. } => ErrorCode::NotFound,
            VmError::Exists(_)
            | VmError::Stopped(_)
            | VmError::StoppedMeanwhile(_)
            | VmError::Paused(_)
            | VmError::Running(_) => ErrorCode::Conflict,
            VmError::Agent { .. } => ErrorCode::Internal,
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

impl From<tokio::task::JoinError> for OpError {
    fn from(e: tokio::task::JoinError) -> Self {
        OpError::internal(format!("a worker task failed: {e}"))
    }
}

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        OpError::internal(format!("state database: {e}"))
    }
}
