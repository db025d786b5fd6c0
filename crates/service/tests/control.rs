//! Properties of the control messages (the fuzz target fuzz/fuzz_targets/control.rs feeds them
//! arbitrary bytes): whatever a client sends parses or is refused, and every request survives
//! its own encoding.

use netkernel_service::control::{EngineRequest, NsmRequest};
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
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    #[test]
    fn engine_requests_round_trip(r in engine_request()) {
        let bytes = serde_json::to_vec(&r).unwrap();
        prop_assert_eq!(serde_json::from_slice::<EngineRequest>(&bytes).unwrap(), r);
    }

    /// Bytes that look like JSON requests, mangled: parsing answers without panicking, and a
    /// request that parses means the same after a round trip.
    #[test]
    fn mangled_requests_parse_or_are_refused(r in engine_request(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
        let mut bytes = serde_json::to_vec(&r).unwrap();
        let at = flip.0 % bytes.len();
        bytes[at] ^= flip.1;
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(parsed) = serde_json::from_slice::<EngineRequest>(&bytes) {
            let again = serde_json::to_vec(&parsed).unwrap();
            prop_assert_eq!(serde_json::from_slice::<EngineRequest>(&again).unwrap(), parsed);
        }
        if let Ok(parsed) = serde_json::from_slice::<NsmRequest>(&bytes) {
            let again = serde_json::to_vec(&parsed).unwrap();
            prop_assert_eq!(serde_json::from_slice::<NsmRequest>(&again).unwrap(), parsed);
        }
    }
}
