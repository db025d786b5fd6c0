// The differential conformance scenarios, declared once. nk-probe runs each by name and lists
// them (`nk-probe list`); tests/conformance.rs makes a test of each on both paths. A binary and
// an integration test cannot share a module, so both `include!` this file and hand the list to
// a macro of their own: `scenarios!(their_macro)`. The test never expands a scenario's `run`.
//
// Each entry: `NAME => RUN, tcp: CONNECTS;` with NAME the probe's first argument, RUN the
// expression that runs the scenario (in the probe), and CONNECTS whether it opens a TCP
// connection, so that the test can require one through the NSM (on the path under test).
macro_rules! scenarios {
    ($then:ident) => {
        $then! {
            connect_open => connect_open(), tcp: true;
            connect_closed => connect_closed(), tcp: true;
            addr_in_use => addr_in_use(), tcp: false;
            accept_nonblocking => accept_nonblocking(), tcp: true;
            half_close => half_close(), tcp: true;
            peer_reset => peer_reset(), tcp: true;
            readiness => readiness(), tcp: true;
            flags => flags(), tcp: true;
            sigpipe => sigpipe(), tcp: true;
            rcvtimeo => rcvtimeo(), tcp: true;
            eintr => eintr(), tcp: true;
            many => many(), tcp: true;
            bulk => bulk(arg(2).unwrap_or(1024)), tcp: true;
            dup => dup_and_fcntl(), tcp: true;
            udp => udp(), tcp: false;
            fork_accept => fork_accept(), tcp: true;
            fork_handoff => fork_handoff(), tcp: true;
            fork_parent_exits => fork_parent_exits(), tcp: false;
            threads => threads(), tcp: true;
            sendfile => sendfile_scenario(), tcp: true;
            exec_cloexec => exec_cloexec(), tcp: true;
            mmsg_and_splice => mmsg_and_splice(), tcp: true;
            small_writes => small_writes(), tcp: true;
            exec_inherit => exec_inherit(), tcp: true;
            vfork_exec => vfork_exec(), tcp: true;
            spawn_listener => spawn_listener(), tcp: true;
            spawn_dup2 => spawn_dup2(), tcp: true;
            exec_no_guest => exec_no_guest(), tcp: true;
            addresses => addresses(), tcp: true;
            execl_family => execl_family(), tcp: true;
            cmsg_udp => cmsg_udp(), tcp: false;
            cmsg_tcp => cmsg_tcp(), tcp: true;
            oob => oob(), tcp: true;
            names_after_reset => names_after_reset(), tcp: true;
            send_after_close => send_after_close(), tcp: true;
            loopback_sync => loopback_sync(), tcp: true;
            sockbuf => sockbuf(), tcp: true;
        }
    };
}
