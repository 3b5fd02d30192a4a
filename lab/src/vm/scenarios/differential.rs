//! (being written)

/// Frames per differential run in CI.
pub const DEFAULT_FRAMES: u32 = 10_000;
