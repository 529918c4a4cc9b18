//! The one place etcd errors become dprim errors.

use dprim::{Error, ErrorKind};
use tonic::Code;

/// Maps an etcd client error onto a portable kind. Transport failures and
/// "no leader" are temporary (a retry may succeed once the cluster settles);
/// refused credentials are `PermissionDenied` and never echo a password.
pub(crate) fn map_error(e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let msg = status.message().to_string();
            let kind = match status.code() {
                _ if msg.contains("authentication failed") => ErrorKind::PermissionDenied,
                _ if msg.contains("required revision has been compacted") => ErrorKind::Resync,
                _ if msg.contains("requested lease not found") => ErrorKind::SessionLost,
                Code::PermissionDenied | Code::Unauthenticated => ErrorKind::PermissionDenied,
                Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
                Code::NotFound => ErrorKind::NotFound,
                Code::DeadlineExceeded => ErrorKind::Timeout,
                Code::Unavailable | Code::Aborted | Code::ResourceExhausted | Code::Cancelled => {
                    ErrorKind::Unavailable
                }
                Code::Unimplemented => ErrorKind::Unsupported,
                _ if msg.contains("leader") || msg.contains("timed out") => ErrorKind::Unavailable,
                // tonic reports a connection that failed below gRPC (refused,
                // reset, a TLS/plain-text mismatch) as an `Unknown` status
                // whose message says "transport error".
                Code::Unknown if msg.contains("transport") || msg.contains("connect") => {
                    ErrorKind::Unavailable
                }
                _ => ErrorKind::Unexpected,
            };
            let text = match kind {
                ErrorKind::PermissionDenied => format!(
                    "etcd refused the request for this identity ({msg}); check `username` and the password reference in [backend]"
                ),
                ErrorKind::Unavailable => format!(
                    "cannot reach etcd ({msg}); check `endpoints`, that the servers run, and that `tls` matches how they listen"
                ),
                _ => format!("etcd: {msg}"),
            };
            let err = Error::new(kind, text);
            // No connection could be made: the request was never sent.
            let unsent = [
                "tcp connect error",
                "error trying to connect",
                "connection refused",
            ]
            .iter()
            .any(|m| msg.to_lowercase().contains(m));
            match kind {
                ErrorKind::Unavailable if unsent => err.temporary().not_applied(),
                ErrorKind::Unavailable | ErrorKind::Timeout => err.temporary(),
                _ => err,
            }
        }
        // Raised while connecting, before any request is sent.
        E::TransportError(t) => Error::new(
            ErrorKind::Unavailable,
            format!("cannot reach etcd: {t}; check `endpoints` and that the server is running"),
        )
        .temporary()
        .not_applied(),
        E::IoError(io) => Error::new(
            ErrorKind::Unavailable,
            format!("etcd connection failed: {io}"),
        )
        .temporary(),
        E::InvalidUri(u) => Error::config(format!("invalid etcd endpoint: {u}")),
        E::EndpointError(m) => Error::config(format!("invalid etcd endpoint: {m}")),
        E::WatchError(m) => {
            Error::new(ErrorKind::Unavailable, format!("etcd watch failed: {m}")).temporary()
        }
        E::LeaseKeepAliveError(m) => Error::new(
            ErrorKind::Unavailable,
            format!("etcd lease keep-alive failed: {m}"),
        )
        .temporary(),
        other => Error::unexpected(format!("etcd client: {other}")),
    }
}

/// A request that did not finish within `request_timeout`.
pub(crate) fn timed_out(what: &str, after: std::time::Duration) -> Error {
    Error::timeout(format!("etcd {what} did not answer within {after:?}")).temporary()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_temporary_unavailable() {
        // What tonic reports when a plain-text client meets a TLS server.
        let status = tonic::Status::new(Code::Unknown, "transport error");
        let e = map_error(etcd_client::Error::GRpcStatus(status));
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.is_temporary());
        assert!(e.to_string().contains("`tls`"), "{e}");
    }

    /// A request that could not be sent is marked so (a write may be retried);
    /// one that failed on an established connection is not (it may have been
    /// applied).
    #[test]
    fn only_unsent_requests_are_marked_not_applied() {
        let refused = tonic::Status::new(
            Code::Unavailable,
            "error trying to connect: tcp connect error: Connection refused (os error 111)",
        );
        let e = map_error(etcd_client::Error::GRpcStatus(refused));
        assert!(e.is_temporary() && e.is_not_applied(), "{e:?}");
        let reset = tonic::Status::new(Code::Unknown, "transport error");
        let e = map_error(etcd_client::Error::GRpcStatus(reset));
        assert!(e.is_temporary() && !e.is_not_applied(), "{e:?}");
        let slow = tonic::Status::new(Code::DeadlineExceeded, "deadline exceeded");
        let e = map_error(etcd_client::Error::GRpcStatus(slow));
        assert!(e.is_temporary() && !e.is_not_applied(), "{e:?}");
    }

    #[test]
    fn refused_credentials_never_echo_a_password() {
        let status = tonic::Status::new(
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        let e = map_error(etcd_client::Error::GRpcStatus(status));
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("username"), "{e}");
    }
}
