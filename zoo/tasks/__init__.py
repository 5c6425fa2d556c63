"""LightningModules: one task per model family, all built on `zoo.tasks.base.ZooModule`."""
