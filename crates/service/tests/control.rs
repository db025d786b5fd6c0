//! Properties of the engine <-> NSM messages (the fuzz target fuzz/fuzz_targets/control.rs feeds
//! them arbitrary bytes): whatever arrives parses or is refused, and whatever parses survives
//! its own encoding. The guest/ctl <-> engine requests' own properties are in netkernel-control;
//! their encodings serve here as JSON tagged by "op", as NsmRequests are.

use netkernel_control::EngineRequest;
use netkernel_service::control::NsmRequest;
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

    /// Bytes that look like JSON requests, mangled: parsing answers without panicking, and a
    /// request that parses means the same after a round trip.
    #[test]
    fn mangled_requests_parse_or_are_refused(r in engine_request(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
        let mut bytes = serde_json::to_vec(&r).unwrap();
        let at = flip.0 % bytes.len();
        bytes[at] ^= flip.1;
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(parsed) = serde_json::from_slice::<NsmRequest>(&bytes) {
            let again = serde_json::to_vec(&parsed).unwrap();
            prop_assert_eq!(serde_json::from_slice::<NsmRequest>(&again).unwrap(), parsed);
        }
    }
}
