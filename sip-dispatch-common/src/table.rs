//! Slot table builder (placeholder, being written).
