//! virtio devices over the virtio-mmio transport (to be written: see ARCHITECTURE.md).
