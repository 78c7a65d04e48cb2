//! The typed protocol: every method with its params, result and event types.
//!
//! [`Request`] is one enum of all requests; its serde form is the wire form
//! (`{"method": "vm.create", "params": {…}}`), so the daemon's dispatch is an
//! exhaustive `match` and a renamed field or method fails to compile on both
//! sides. Each method also has a marker type in [`m`] implementing [`Method`],
//! which ties its params to its result and its progress events: the CLI calls
//! `client.call::<m::VmCreate>(params, …)` and gets a `VmInfo` back.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::image::{ImageImportParams, NamesParams, RemoveParams, RemoveResult};
use crate::image::{ImageInfo, PruneParams, PruneResult, PullEvent, PullParams, PullResult};
use crate::kernel::{ImportParams, KernelInfo, PullParams as KernelPullParams};
use crate::vm::StatsParams;
use crate::vm::{CreateParams, ExecEvent, ExecParams, ExecResult, ForwardEvent, LogEvent};
use crate::vm::{LogsParams, LogsResult, NameParams, PortForwardParams, PortForwardResult};
use crate::vm::{RestoreParams, SetParams, SnapshotInfo, SnapshotParams, WarmParams};
use crate::vm::{StopParams, SyncParams, SyncProgress, SyncResult, VmEvent, VmInfo};

/// One method of the protocol, as a type.
pub trait Method {
    /// The name on the wire.
    const NAME: &'static str;
    type Params: Serialize + DeserializeOwned;
    type Result: Serialize + DeserializeOwned;
    /// What the daemon streams before the result ([`NoEvent`] when nothing).
    type Event: Serialize + DeserializeOwned;
    fn request(params: Self::Params) -> Request;
}

/// Params of the methods that take none; `{}` on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoParams {}

/// The event type of methods that stream nothing: it has no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoEvent {}

/// Why a line is not a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Not a `{"method": …}` object at all.
    Malformed(String),
    UnknownMethod(String),
    /// A known method with params that do not fit it.
    InvalidParams(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Malformed(e) => write!(f, "malformed request: {e}"),
            RequestError::UnknownMethod(m) => write!(f, "unknown method `{m}`"),
            RequestError::InvalidParams(e) => write!(f, "invalid params: {e}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// The loose shape every request line has, whatever its method: what a
/// transport reads first, to log the method before checking its params.
#[derive(Debug, Deserialize)]
pub struct RawRequest {
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

impl RawRequest {
    pub fn from_json(line: &str) -> Result<RawRequest, RequestError> {
        serde_json::from_str(line).map_err(|e| RequestError::Malformed(e.to_string()))
    }

    pub fn typed(self) -> Result<Request, RequestError> {
        Request::from_parts(&self.method, self.params)
    }
}

macro_rules! protocol {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal: $params:ty => $result:ty, $event:ty; )*) => {
        /// Every request the daemon answers.
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(tag = "method", content = "params")]
        pub enum Request {
            $( $(#[$doc])* #[serde(rename = $name)] $variant($params), )*
        }

        /// One marker type per method.
        pub mod m {
            use super::*;
            $(
                $(#[$doc])*
                pub struct $variant;
                impl Method for $variant {
                    const NAME: &'static str = $name;
                    type Params = $params;
                    type Result = $result;
                    type Event = $event;
                    fn request(params: $params) -> Request {
                        Request::$variant(params)
                    }
                }
            )*
        }

        /// Every method name; a test holds `docs/rpc.md` to this list.
        pub const ALL: &[&str] = &[$($name),*];

        impl Request {
            /// The method's name on the wire.
            pub fn method(&self) -> &'static str {
                match self {
                    $( Request::$variant(_) => $name, )*
                }
            }
        }
    };
}

protocol! {
    DaemonStatus = "daemon.status": NoParams => crate::status::DaemonStatus, NoEvent;
    ImagePull = "image.pull": PullParams => PullResult, PullEvent;
    ImageImport = "image.import": ImageImportParams => PullResult, PullEvent;
    ImageList = "image.list": NoParams => Vec<ImageInfo>, NoEvent;
    ImageInspect = "image.inspect": NamesParams => Vec<ImageInfo>, NoEvent;
    ImageRemove = "image.remove": RemoveParams => RemoveResult, NoEvent;
    ImageCachePrune = "image.cache.prune": PruneParams => PruneResult, NoEvent;
    KernelImport = "kernel.import": ImportParams => KernelInfo, NoEvent;
    KernelList = "kernel.list": NoParams => Vec<KernelInfo>, NoEvent;
    KernelInspect = "kernel.inspect": NamesParams => Vec<KernelInfo>, NoEvent;
    KernelRemove = "kernel.remove": RemoveParams => RemoveResult, NoEvent;
    KernelPull = "kernel.pull": KernelPullParams => KernelInfo, PullEvent;
    VmCreate = "vm.create": CreateParams => VmInfo, VmEvent;
    VmStart = "vm.start": NameParams => VmInfo, VmEvent;
    VmStop = "vm.stop": StopParams => VmInfo, NoEvent;
    VmRestart = "vm.restart": StopParams => VmInfo, VmEvent;
    VmRemove = "vm.remove": RemoveParams => RemoveResult, NoEvent;
    VmList = "vm.list": NoParams => Vec<VmInfo>, NoEvent;
    VmInspect = "vm.inspect": NamesParams => Vec<VmInfo>, NoEvent;
    VmLogs = "vm.logs": LogsParams => LogsResult, LogEvent;
    VmExec = "vm.exec": ExecParams => ExecResult, ExecEvent;
    VmSync = "vm.sync": SyncParams => SyncResult, SyncProgress;
    VmPortForward = "vm.port_forward": PortForwardParams => PortForwardResult, ForwardEvent;
    VmPause = "vm.pause": NameParams => VmInfo, NoEvent;
    VmSet = "vm.set": SetParams => VmInfo, VmEvent;
    VmStats = "vm.stats": StatsParams => Vec<crate::vm::VmStats>, NoEvent;
    VmResume = "vm.resume": NameParams => VmInfo, NoEvent;
    VmSnapshot = "vm.snapshot": SnapshotParams => SnapshotInfo, VmEvent;
    VmRestore = "vm.restore": RestoreParams => VmInfo, VmEvent;
    ImageWarm = "image.warm": WarmParams => SnapshotInfo, VmEvent;
    SnapshotList = "snapshot.list": NoParams => Vec<SnapshotInfo>, NoEvent;
    SnapshotInspect = "snapshot.inspect": NamesParams => Vec<SnapshotInfo>, NoEvent;
    SnapshotRemove = "snapshot.remove": RemoveParams => RemoveResult, NoEvent;
}

impl Request {
    /// Reads one request line. Missing or `null` params read as `{}`, as
    /// every daemon so far has accepted them.
    pub fn from_json(line: &str) -> Result<Request, RequestError> {
        RawRequest::from_json(line)?.typed()
    }

    /// A request from its method name and params.
    pub fn from_parts(method: &str, params: Value) -> Result<Request, RequestError> {
        if !ALL.contains(&method) {
            return Err(RequestError::UnknownMethod(method.to_string()));
        }
        let params = match params {
            Value::Null => Value::Object(Default::default()),
            other => other,
        };
        let tagged = serde_json::json!({ "method": method, "params": params });
        serde_json::from_value(tagged).map_err(|e| RequestError::InvalidParams(e.to_string()))
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("requests serialise");
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_is_method_and_params() {
        let line = m::VmStop::request(StopParams {
            name: "web".into(),
            timeout_secs: Some(3),
        })
        .to_line();
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"method": "vm.stop", "params": {"name": "web", "timeout_secs": 3}})
        );
        let back = Request::from_json(std::str::from_utf8(&line).unwrap()).unwrap();
        assert_eq!(back.method(), "vm.stop");
    }

    #[test]
    fn requests_without_params_read_as_empty() {
        for line in [
            r#"{"method":"vm.list"}"#,
            r#"{"method":"vm.list","params":null}"#,
            r#"{"method":"vm.list","params":{}}"#,
        ] {
            assert!(matches!(
                Request::from_json(line),
                Ok(Request::VmList(NoParams {}))
            ));
        }
        assert_eq!(
            serde_json::to_value(m::ImageList::request(NoParams {})).unwrap(),
            serde_json::json!({"method": "image.list", "params": {}})
        );
    }

    #[test]
    fn bad_requests_say_which_way_they_are_bad() {
        assert!(matches!(
            Request::from_json("[1]"),
            Err(RequestError::Malformed(_))
        ));
        assert_eq!(
            Request::from_json(r#"{"method":"no.such"}"#).unwrap_err(),
            RequestError::UnknownMethod("no.such".into())
        );
        let err = Request::from_json(r#"{"method":"vm.start","params":{}}"#).unwrap_err();
        assert!(
            matches!(&err, RequestError::InvalidParams(m) if m.contains("name")),
            "{err}"
        );
    }

    #[test]
    fn every_listed_method_reads_back() {
        for name in ALL {
            // Params that fit no method: only the method name must be known.
            match Request::from_parts(name, Value::Null) {
                Ok(r) => assert_eq!(r.method(), *name),
                Err(e) => assert!(matches!(e, RequestError::InvalidParams(_)), "{name}: {e}"),
            }
        }
    }
}
