module llamaherd.local/runc-wrapper

go 1.24
