//! The protocol of the engine's control socket (docs/ABI.md section 12.2), spoken by GuestLib
//! (attach, hold, join), `netkernel ctl` and the engine. Both sides build and read these types,
//! so a field cannot be spelled one way by the guest and another by the engine.
//!
//! The wire format is fixed by running processes: a guest attached to one engine talks to the
//! next one after a restart, and an engine serves guests whose GuestLib is older or newer. So
//! fields keep their names and JSON shapes; a new field must be optional on both sides.
//!
//! Each message is one JSON document in a frame of `netkernel_ring::sys::send_frame`, with file
//! descriptors passed alongside by SCM_RIGHTS. The same [`Reply`] envelope also carries the
//! NSMs' answers to the engine (their requests are `netkernel_service::control::NsmRequest`).

use netkernel_ring::sys;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;
use std::os::fd::RawFd;

/// What a client of the engine's control socket asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum EngineRequest {
    /// A guest process asks for an attachment. The engine identifies it by SO_PEERCRED; the
    /// tenant named here must accept that uid. Reply: [`AttachReply`]; fds: region memfd, NSM
    /// doorbell, guest doorbell.
    Attach {
        /// Always sent (`null` for "the first tenant that admits me"), as GuestLib always has.
        tenant: Option<String>,
        /// The secret of a tenant with a token_file, read by GuestLib from NETKERNEL_TOKEN_FILE.
        /// Left out when there is none, as GuestLib always has.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The guest says it runs in a network namespace of its own (`netkernel run --isolate`);
        /// the engine checks that before giving it a private loopback.
        #[serde(default)]
        isolated: bool,
    },
    /// A guest process that just forked `pid` asks to keep the attachment alive for the child:
    /// the attachment lives until its last process exits. Reply: `null`.
    Hold {
        attachment: u64,
        pid: i32,
        /// The holder index the parent reserved for the child (ABI.md section 12.4).
        holder: u32,
    },
    /// A process that inherited NetKernel sockets across exec (or posix_spawn, vfork+exec) holds
    /// the attachment as `holder`; the region's memfd, passed with the request, proves it.
    /// Reply: [`JoinReply`]; fds: NSM doorbell, guest doorbell.
    Join {
        attachment: u64,
        holder: u32,
    },
    Status,
    Tenants,
    Nsms,
    Conns,
    /// Stop the engine and its NSMs for good: guests' sockets are reset (`ctl shutdown`).
    Shutdown,
    /// Apply the configuration file anew (`ctl reload`). Reply: [`ReloadReport`].
    Reload,
    /// Replace NSM `nsm`'s process by a new one (from `binary`, else the engine's own) that
    /// takes over its guests while they run (`ctl upgrade`). `force`: an earlier user-NSM
    /// upgrade's old process still relaying connections is stopped first (they are reset).
    /// Reply: [`UpgradeReport`].
    Upgrade {
        nsm: String,
        binary: Option<String>,
        #[serde(default)]
        force: bool,
    },
    /// Serve tenant `tenant` by NSM `to` from now on, its running guests' connections too (`ctl
    /// move`). Reply: [`MoveReport`].
    Move {
        tenant: String,
        to: String,
    },
}

/// What a move did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MoveReport {
    pub tenant: String,
    pub from: String,
    pub to: String,
    /// Attachments (guest processes) and sockets that moved with their connections.
    pub attachments: usize,
    pub sockets: usize,
    /// From the old NSM stopping to the new one serving the moved guests, milliseconds (0 when
    /// no guest was attached).
    pub blackout_ms: f64,
    /// Attachments left on the old NSM until their processes exit (a move to or from a user NSM,
    /// whose connections cannot change process: they drain).
    #[serde(default)]
    pub draining: usize,
    /// What is in effect against what the configuration file says.
    pub note: String,
}

/// What an upgrade did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UpgradeReport {
    pub nsm: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// The longest time no guest request was served: from the old process stopping to the new
    /// one serving, milliseconds.
    pub blackout_ms: f64,
    pub attachments: usize,
    pub sockets: usize,
    /// A user NSM's upgrade: the old process keeps serving these attachments and sockets until
    /// they end (new attachments go to the new process); 0 for a kernel NSM.
    #[serde(default)]
    pub draining_attachments: usize,
    #[serde(default)]
    pub draining_sockets: usize,
    /// The binary the NSM runs now.
    pub binary: String,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadReport {
    pub config: String,
    /// Tenants that may attach from now on.
    pub added: Vec<String>,
    /// Tenants gone: their guests' sockets were reset.
    pub removed: Vec<String>,
    /// Tenants whose admission or policy changed: in effect at once, for live guests too.
    pub changed: Vec<String>,
    /// NSMs whose congestion control changed ("NAME: OLD -> NEW"): for new connections.
    #[serde(default)]
    pub nsms: Vec<String>,
    /// NSMs the edit added, started now.
    #[serde(default)]
    pub nsms_added: Vec<String>,
}

impl EngineRequest {
    /// Reads a request as the engine receives it: anything that is not one is an error, never a
    /// panic (anyone on the host may connect).
    pub fn parse(bytes: &[u8]) -> Result<EngineRequest, Error> {
        serde_json::from_slice(bytes).map_err(Error::Malformed)
    }
}

/// The engine's answer to an attach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttachReply {
    pub attachment: u64,
    pub tenant: String,
    pub nsm: String,
}

/// The engine's answer to a join.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct JoinReply {
    /// The holder index the engine has for the process: the one it asked for, or the one it
    /// already held with (a vfork child joins once for all its exec attempts).
    pub holder: u32,
}

/// Every reply, from the engine and from an NSM: `ok` and either `result` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Reply {
    pub fn ok(result: impl Serialize) -> Reply {
        Reply { ok: true, error: None, result: Some(serde_json::to_value(result).unwrap_or_default()) }
    }

    pub fn err(msg: impl Into<String>) -> Reply {
        Reply { ok: false, error: Some(msg.into()), result: None }
    }

    /// The reply's payload in a frame.
    pub fn encode(&self) -> Vec<u8> {
        // A Reply holds strings, a bool and a Value: it always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the reply in `bytes` and its result as a `T` (`serde_json::Value` for any).
    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
        let reply: Reply = serde_json::from_slice(bytes).map_err(Error::Malformed)?;
        if !reply.ok {
            return Err(Error::Refused(reply.error.unwrap_or_default()));
        }
        // `Reply::ok(())` sends `"result": null`; an absent result reads the same.
        T::deserialize(reply.result.unwrap_or_default()).map_err(Error::Malformed)
    }
}

/// Why a request got no usable answer.
#[derive(Debug)]
pub enum Error {
    /// The request could not be sent.
    Send(io::Error),
    /// The reply could not be read (including a frame too long).
    Recv(io::Error),
    /// The peer closed the connection without replying.
    Closed,
    /// Bytes that are not the message expected (or a result of the wrong shape).
    Malformed(serde_json::Error),
    /// The peer refused, in its own words.
    Refused(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Send(e) => write!(f, "sending the request: {e}"),
            Error::Recv(e) => write!(f, "reading the reply: {e}"),
            Error::Closed => f.write_str("connection closed before the reply"),
            Error::Malformed(e) => write!(f, "malformed message: {e}"),
            Error::Refused(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Send(e) | Error::Recv(e) => Some(e),
            Error::Malformed(e) => Some(e),
            Error::Closed | Error::Refused(_) => None,
        }
    }
}

/// One request/response on the connected control socket `sock`, passing `fds` with the
/// request: the reply's result as a `T`, and the fds that came with it (the caller owns them).
/// On any error the fds that came with the reply are closed.
pub fn call<T: DeserializeOwned>(sock: RawFd, req: &impl Serialize, fds: &[RawFd]) -> Result<(T, Vec<RawFd>), Error> {
    let body = serde_json::to_vec(req).map_err(Error::Malformed)?;
    sys::send_frame(sock, &body, fds).map_err(Error::Send)?;
    let (payload, fds) = sys::recv_frame(sock).map_err(Error::Recv)?.ok_or(Error::Closed)?;
    match Reply::decode(&payload) {
        Ok(result) => Ok((result, fds)),
        Err(e) => {
            fds.into_iter().for_each(sys::close);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn engine_request() -> impl Strategy<Value = EngineRequest> {
        let name = || proptest::option::of(".{0,40}");
        prop_oneof![
            (name(), name(), any::<bool>()).prop_map(|(tenant, token, isolated)| EngineRequest::Attach {
                tenant,
                token,
                isolated
            }),
            (any::<u64>(), any::<i32>(), any::<u32>()).prop_map(|(attachment, pid, holder)| EngineRequest::Hold {
                attachment,
                pid,
                holder
            }),
            (any::<u64>(), any::<u32>()).prop_map(|(attachment, holder)| EngineRequest::Join { attachment, holder }),
            Just(EngineRequest::Status),
            Just(EngineRequest::Tenants),
            Just(EngineRequest::Nsms),
            Just(EngineRequest::Conns),
            Just(EngineRequest::Shutdown),
            Just(EngineRequest::Reload),
            ("[a-z]{1,8}", proptest::option::of("/[a-z/]{1,20}"), proptest::bool::ANY)
                .prop_map(|(nsm, binary, force)| EngineRequest::Upgrade { nsm, binary, force }),
            (".{0,20}", ".{0,20}").prop_map(|(tenant, to)| EngineRequest::Move { tenant, to }),
        ]
    }

    fn json(v: &impl Serialize) -> serde_json::Value {
        serde_json::to_value(v).unwrap()
    }

    /// The bytes GuestLib sent before these types existed (it built them with `json!`), which
    /// running guests still send and running engines still expect.
    #[test]
    fn the_wire_format_is_the_one_guests_and_engines_already_speak() {
        let attach = EngineRequest::Attach { tenant: None, token: None, isolated: false };
        assert_eq!(json(&attach), serde_json::json!({"op": "attach", "tenant": null, "isolated": false}));
        let attach = EngineRequest::Attach { tenant: Some("t".into()), token: Some("s".into()), isolated: true };
        assert_eq!(json(&attach), serde_json::json!({"op": "attach", "tenant": "t", "isolated": true, "token": "s"}));
        let hold = EngineRequest::Hold { attachment: 7, pid: 42, holder: 3 };
        assert_eq!(json(&hold), serde_json::json!({"op": "hold", "attachment": 7, "pid": 42, "holder": 3}));
        let join = EngineRequest::Join { attachment: 7, holder: 3 };
        assert_eq!(json(&join), serde_json::json!({"op": "join", "attachment": 7, "holder": 3}));
        assert_eq!(json(&EngineRequest::Status), serde_json::json!({"op": "status"}));
        // What ctl and ABI.md send: the bare op, no optional fields.
        assert_eq!(
            EngineRequest::parse(br#"{"op":"attach"}"#).unwrap(),
            EngineRequest::Attach { tenant: None, token: None, isolated: false }
        );

        assert_eq!(json(&Reply::ok(())), serde_json::json!({"ok": true, "result": null}));
        assert_eq!(json(&Reply::err("no")), serde_json::json!({"ok": false, "error": "no"}));
        assert_eq!(json(&Reply::ok(JoinReply { holder: 5 })), serde_json::json!({"ok": true, "result": {"holder": 5}}));
        let a = AttachReply { attachment: 1, tenant: "t".into(), nsm: "n".into() };
        assert_eq!(json(&a), serde_json::json!({"attachment": 1, "tenant": "t", "nsm": "n"}));
    }

    #[test]
    fn replies_read_back_as_their_result_or_a_typed_error() {
        let bytes = Reply::ok(JoinReply { holder: 9 }).encode();
        assert_eq!(Reply::decode::<JoinReply>(&bytes).unwrap(), JoinReply { holder: 9 });
        Reply::decode::<()>(&Reply::ok(()).encode()).unwrap();
        // An engine that sends no result at all still answers a hold.
        Reply::decode::<()>(br#"{"ok":true}"#).unwrap();
        assert!(matches!(Reply::decode::<()>(&Reply::err("nope").encode()), Err(Error::Refused(m)) if m == "nope"));
        // A result of the wrong shape, garbage, and a request where a reply belongs.
        assert!(matches!(Reply::decode::<JoinReply>(&Reply::ok(()).encode()), Err(Error::Malformed(_))));
        assert!(matches!(Reply::decode::<()>(b"\xff{"), Err(Error::Malformed(_))));
        assert!(matches!(Reply::decode::<()>(br#"{"op":"status"}"#), Err(Error::Malformed(_))));
    }

    #[test]
    fn unknown_and_garbage_requests_are_typed_errors() {
        for bad in [
            &br#"{"op":"frobnicate"}"#[..],
            br#"{"attachment":1}"#,
            br#"{"op":"hold","attachment":1}"#,
            br#"{"op":"join","attachment":-1,"holder":0}"#,
            b"",
            b"\x00\x01\x02",
            b"[]",
        ] {
            assert!(matches!(EngineRequest::parse(bad), Err(Error::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_call_carries_the_request_and_returns_the_result_and_fds() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        let engine = std::thread::spawn(move || {
            let (payload, fds) = sys::recv_frame(b.as_raw_fd()).unwrap().unwrap();
            assert!(fds.is_empty());
            let EngineRequest::Join { holder, .. } = EngineRequest::parse(&payload).unwrap() else { panic!() };
            sys::send_frame(b.as_raw_fd(), &Reply::ok(JoinReply { holder }).encode(), &[b.as_raw_fd()]).unwrap();
            let _ = sys::recv_frame(b.as_raw_fd()).unwrap().unwrap();
            sys::send_frame(b.as_raw_fd(), &Reply::err("refused").encode(), &[b.as_raw_fd()]).unwrap();
            // The third request goes unanswered: the engine exits with it.
            let _ = sys::recv_frame(b.as_raw_fd()).unwrap().unwrap();
        });
        let (r, fds) =
            call::<JoinReply>(a.as_raw_fd(), &EngineRequest::Join { attachment: 1, holder: 4 }, &[]).unwrap();
        assert_eq!((r, fds.len()), (JoinReply { holder: 4 }, 1));
        fds.into_iter().for_each(sys::close);
        let e = call::<()>(a.as_raw_fd(), &EngineRequest::Status, &[]).unwrap_err();
        assert_eq!(e.to_string(), "refused");
        assert!(matches!(call::<()>(a.as_raw_fd(), &EngineRequest::Status, &[]), Err(Error::Closed)));
        engine.join().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn requests_round_trip(r in engine_request()) {
            prop_assert_eq!(EngineRequest::parse(&serde_json::to_vec(&r).unwrap()).unwrap(), r);
        }

        /// Bytes that look like requests, mangled: parsing answers without panicking, and a
        /// request that parses means the same after a round trip.
        #[test]
        fn mangled_requests_parse_or_are_refused(
            r in engine_request(),
            cut in any::<usize>(),
            flip in any::<(usize, u8)>(),
        ) {
            let mut bytes = serde_json::to_vec(&r).unwrap();
            let at = flip.0 % bytes.len();
            bytes[at] ^= flip.1;
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(parsed) = EngineRequest::parse(&bytes) {
                let again = serde_json::to_vec(&parsed).unwrap();
                prop_assert_eq!(EngineRequest::parse(&again).unwrap(), parsed);
            }
        }
    }
}
