//! Digest auth from config: nodes dprim creates carry an ACL for the
//! configured identity only; another identity (or none) is refused with
//! `PermissionDenied` and a clear message; the password never appears in
//! Debug output or errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, ErrorKind, Key, KvExt, Value};
use std::time::Duration;
use support::Servers;

const PORT: u16 = 2284;
const ALICE_PW: &str = "alice-s3cret-pw";
const BOB_PW: &str = "bob-s3cret-pw";

fn config(user: Option<(&str, &str)>) -> Config {
    let auth = match user {
        Some((name, var)) => format!("username = \"{name}\"\npassword = {{ env = \"{var}\" }}\n"),
        None => String::new(),
    };
    Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nnamespace = \"secured\"\n{auth}"
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_identity_is_denied_and_password_never_shown() {
    let servers = Servers::new("auth", Some(PORT));
    servers.script(&["start"]);
    std::env::set_var("DPRIM_TEST_ZK_ALICE_PW", ALICE_PW);
    std::env::set_var("DPRIM_TEST_ZK_BOB_PW", BOB_PW);

    let alice_config = config(Some(("alice", "DPRIM_TEST_ZK_ALICE_PW")));
    let alice = dprim_zookeeper::connect(&alice_config.backend)
        .await
        .unwrap();
    let key = Key::new("config/db").unwrap();
    alice
        .kv()
        .put(&key, Value::new(b"secret value".to_vec()).unwrap())
        .await
        .unwrap();
    let session = alice.sessions().open(Duration::from_secs(4)).await.unwrap();
    let guard = alice
        .locks()
        .lock(&Key::new("jobs").unwrap(), &session, Duration::from_secs(5))
        .await
        .unwrap();
    let queue = alice
        .queues()
        .open(&Key::new("work").unwrap(), None)
        .await
        .unwrap();
    queue
        .push(Value::new(b"task".to_vec()).unwrap())
        .await
        .unwrap();

    let mut shown = format!("{alice_config:?} {alice:?} {session:?} {guard:?}");
    for (who, config) in [
        ("bob", config(Some(("bob", "DPRIM_TEST_ZK_BOB_PW")))),
        ("anonymous", config(None)),
    ] {
        let other = dprim_zookeeper::connect(&config.backend).await.unwrap();
        let read = other.kv().get(&key).await.unwrap_err();
        assert_eq!(
            read.kind(),
            ErrorKind::PermissionDenied,
            "{who} read: {read}"
        );
        assert!(
            read.to_string().contains("ACL") && read.to_string().contains("username"),
            "{who}: the message should say what to check: {read}"
        );
        let write = other
            .kv()
            .put(&key, Value::new(b"overwritten".to_vec()).unwrap())
            .await
            .unwrap_err();
        assert_eq!(
            write.kind(),
            ErrorKind::PermissionDenied,
            "{who} write: {write}"
        );
        let delete = other.kv().delete(&key).await.unwrap_err();
        assert_eq!(
            delete.kind(),
            ErrorKind::PermissionDenied,
            "{who} delete: {delete}"
        );
        let other_queue = other.queues().open(&Key::new("work").unwrap(), None).await;
        let pulled = match other_queue {
            Ok(q) => q.pull(Default::default()).await.map(|_| ()),
            Err(e) => Err(e),
        }
        .unwrap_err();
        assert_eq!(
            pulled.kind(),
            ErrorKind::PermissionDenied,
            "{who} pull: {pulled}"
        );
        shown.push_str(&format!(
            "{config:?} {other:?} {read:?} {read} {write} {delete:?} {pulled}"
        ));
    }
    // The owner still sees its data intact.
    let entry = alice.kv().get(&key).await.unwrap().unwrap();
    assert_eq!(entry.value.as_bytes(), b"secret value");

    // Wrong password for alice's identity: nothing of alice's is readable.
    std::env::set_var("DPRIM_TEST_ZK_WRONG_PW", "not-the-password");
    let wrong =
        dprim_zookeeper::connect(&config(Some(("alice", "DPRIM_TEST_ZK_WRONG_PW"))).backend)
            .await
            .unwrap();
    let e = wrong.kv().get(&key).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    shown.push_str(&format!("{e} {e:?}"));

    for pw in [ALICE_PW, BOB_PW, "not-the-password"] {
        assert!(!shown.contains(pw), "a password appeared in output");
    }
    guard.unlock().await.unwrap();
    session.close().await.unwrap();
}
