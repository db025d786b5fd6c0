//! Properties of the engine <-> NSM messages (the fuzz target fuzz/fuzz_targets/control.rs feeds
//! them arbitrary bytes): whatever arrives parses or is refused, and whatever parses survives
//! its own encoding. The guest/ctl <-> engine requests' own properties are in netkernel-control.

use netkernel_service::control::{NsmRequest, TenantPolicy};
use proptest::prelude::*;

fn nsm_request() -> impl Strategy<Value = NsmRequest> {
    prop_oneof![
        (any::<u64>(), ".{0,40}", any::<i32>(), any::<u32>(), any::<bool>(), proptest::option::of(any::<u32>()))
            .prop_map(|(attachment, tenant, pid, uid, colocate, max_sockets)| NsmRequest::Attach {
                attachment,
                tenant,
                pid,
                uid,
                policy: TenantPolicy { colocate, max_sockets, ..TenantPolicy::default() },
            }),
        (any::<u64>(), any::<u32>()).prop_map(|(attachment, holder)| NsmRequest::Hold { attachment, holder }),
        any::<u64>().prop_map(|attachment| NsmRequest::Region { attachment }),
        Just(NsmRequest::Stats),
        Just(NsmRequest::Adopt),
        Just(NsmRequest::Shutdown),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    /// Bytes that look like JSON requests, mangled: parsing answers without panicking, and a
    /// request that parses means the same after a round trip.
    #[test]
    fn mangled_requests_parse_or_are_refused(r in nsm_request(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
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
