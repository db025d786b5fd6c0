//! A control-socket message from anyone who can connect: the engine's requests (guests, ctl)
//! and the NSM's (from the engine) parse without panicking, and whatever parses means the same
//! after a round trip through its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netkernel_control::{AttachReply, EngineRequest, JoinReply, Reply};
use netkernel_service::control::{NsmRequest, NsmStats};

fuzz_target!(|data: &[u8]| {
    // The engine reads its requests exactly so.
    if let Ok(r) = EngineRequest::parse(data) {
        let again = EngineRequest::parse(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }
    if let Ok(r) = serde_json::from_slice::<NsmRequest>(data) {
        let again: NsmRequest = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }
    // What the guest and ctl read back from the engine, and the engine from an NSM.
    if let Ok(r) = serde_json::from_slice::<Reply>(data) {
        assert_eq!(serde_json::from_slice::<Reply>(&r.encode()).unwrap(), r);
    }
    let _ = Reply::decode::<AttachReply>(data);
    let _ = Reply::decode::<JoinReply>(data);
    let _ = Reply::decode::<()>(data);
    let _ = serde_json::from_slice::<NsmStats>(data);
});
