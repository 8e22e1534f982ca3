//! Configuration: loading, validation and defaults. (placeholder, being written)
