//! Helpers shared by the fuzz targets in `fuzz_targets/`.

/// Splits a fuzz input into the cut plan that opens it and the payload behind it.
///
/// The first byte says how many plan bytes follow (0 to 7); each plan byte `b` is the length
/// (`b + 1`) of one read, the lengths used in turn until the payload is spent. No plan bytes means
/// one read of the whole payload. The fuzzer thus chooses where reads cut a stream, the way TCP
/// segments do.
pub fn split_plan(input: &[u8]) -> (&[u8], &[u8]) {
    let Some((&count, rest)) = input.split_first() else {
        return (&[], &[]);
    };
    rest.split_at(usize::from(count % 8).min(rest.len()))
}

/// The reads that `plan` (from [`split_plan`]) cuts `payload` into, in order.
pub fn reads<'a>(plan: &'a [u8], payload: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut lengths = plan.iter().map(|&b| usize::from(b) + 1).cycle();
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let take = lengths.next().unwrap_or(rest.len()).min(rest.len());
        let (read, after) = rest.split_at(take);
        rest = after;
        Some(read)
    })
}
