//! `aura-afl TARGET`: one fuzz target of tests/fuzz/targets.rs under AFL++. The input's own
//! bytes seed the ways it is split across reads, so a finding replays exactly.

#[path = "../../targets.rs"]
#[allow(dead_code)]
mod targets;

fn main() {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!(
            "usage: aura-afl TARGET (one of: request_head response_head chunked sse rewrite usage)"
        );
        std::process::exit(2);
    };
    let Some(&(_, target)) = targets::TARGETS.iter().find(|(n, _)| *n == name) else {
        eprintln!("aura-afl: no target {name}");
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        let seed = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = targets::Rng(seed | 1);
        if let Err(oracle) = target(data, &mut rng) {
            panic!("{name}: {oracle}");
        }
    });
}
