//! The one place ZooKeeper errors become dprim errors.

use dprim::{Error, ErrorKind};
use std::time::Duration;

/// Maps a ZooKeeper client error onto a portable kind. Connection loss and
/// request timeouts are temporary (the client reconnects on its own and a
/// retry may succeed); an expired or closed session is `SessionLost`;
/// refused credentials and ACL denials are `PermissionDenied` and never echo
/// a password.
pub(crate) fn map_error(e: zookeeper_client::Error) -> Error {
    use zookeeper_client::Error as Z;
    let (kind, text) = match &e {
        Z::NoNode => (ErrorKind::NotFound, format!("zookeeper: {e}")),
        Z::NodeExists => (ErrorKind::AlreadyExists, format!("zookeeper: {e}")),
        Z::BadVersion | Z::RuntimeInconsistent => (ErrorKind::Conflict, format!("zookeeper: {e}")),
        Z::NoAuth => (
            ErrorKind::PermissionDenied,
            "zookeeper denied the operation: the node's ACL does not grant this identity; check `username` and the password reference in [backend]".to_string(),
        ),
        Z::AuthFailed => (
            ErrorKind::PermissionDenied,
            "zookeeper rejected the credentials; check `username` and the password reference in [backend]".to_string(),
        ),
        Z::InvalidAcl => (
            ErrorKind::PermissionDenied,
            "zookeeper refused the node's ACL for this identity; check `username` and the password reference in [backend]".to_string(),
        ),
        Z::SessionExpired | Z::ClientClosed | Z::SessionMoved => (
            ErrorKind::SessionLost,
            format!("zookeeper session ended: {e}"),
        ),
        Z::ConnectionLoss | Z::Throttled => (
            ErrorKind::Unavailable,
            format!("zookeeper connection lost: {e}; check `endpoints` and that the servers are running"),
        ),
        // The client fails requests in flight with the connection's own
        // failure (an I/O error such as a reset, or no response in time)
        // when a server goes away; the session reconnects by itself.
        Z::Custom(_) => (
            ErrorKind::Unavailable,
            format!("zookeeper connection failed: {e}; check `endpoints` and that the servers are running"),
        ),
        Z::NoHosts => (
            ErrorKind::Unavailable,
            "no zookeeper server could be reached; check `endpoints` and that the servers are running".to_string(),
        ),
        Z::Timeout => (ErrorKind::Timeout, format!("zookeeper: {e}")),
        Z::BadArguments(_) | Z::NotEmpty | Z::NoChildrenForEphemerals => {
            (ErrorKind::InvalidArgument, format!("zookeeper: {e}"))
        }
        Z::Unimplemented | Z::ReconfigDisabled | Z::NotReadOnly => {
            (ErrorKind::Unsupported, format!("zookeeper: {e}"))
        }
        Z::QuotaExceeded => (ErrorKind::InvalidArgument, format!("zookeeper: {e}")),
        _ => (ErrorKind::Unexpected, format!("zookeeper client: {e}")),
    };
    let err = Error::new(kind, text);
    match kind {
        // No server could be reached, or the server turned the request
        // away before acting on it.
        ErrorKind::Unavailable if matches!(e, Z::NoHosts | Z::Throttled) => {
            err.temporary().not_applied()
        }
        ErrorKind::Unavailable | ErrorKind::Timeout => err.temporary(),
        _ => err,
    }
}

/// A request that did not finish within `request_timeout`.
pub(crate) fn timed_out(what: &str, after: Duration) -> Error {
    Error::timeout(format!("zookeeper {what} did not answer within {after:?}")).temporary()
}
