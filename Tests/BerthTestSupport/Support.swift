// Fixtures shared by test targets: a real etcd, a real dockerd.
