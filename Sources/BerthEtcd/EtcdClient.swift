// The etcd v3 client lands here (issue 5).
