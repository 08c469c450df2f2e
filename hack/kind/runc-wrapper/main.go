// Command llamaherd-runc is the Docker engine's OCI runtime on hosts that cannot grant
// CAP_SYS_RESOURCE.
//
// Why it exists: kind starts every node with `docker run --privileged`, and Docker asks runc for
// every capability it knows under --privileged. Where the host's capability bounding set lacks
// CAP_SYS_RESOURCE (some sandboxed VMs and CI runners), runc refuses ("unable to apply caps:
// operation not permitted") and no kind node can start. This wrapper removes the capabilities
// that the bounding set of the calling process does not hold, and only those, from the
// container's config.json (create, run) or process.json (exec), then hands the untouched argument
// list to the real runc. Where the bounding set is full it changes nothing.
//
// hack/images.sh installs it with `dockerd --add-runtime llamaherd-runc=<path> --default-runtime
// llamaherd-runc` only when /proc/self/status shows the capability missing. See docs/e2e.md.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// The capabilities this wrapper may remove, by number (linux/capability.h). Only CAP_SYS_RESOURCE
// is known to be missing on the hosts this was written for; the list says what it may touch.
var removable = map[string]uint{"CAP_SYS_RESOURCE": 24}

// runc's global flags that take a value (`--root DIR`, `--log FILE`, ...).
var globalWithValue = map[string]bool{
	"--root": true, "--log": true, "--log-format": true, "--criu": true, "--rootless": true,
}

func main() {
	args := os.Args[1:]
	real, err := realRunc()
	if err != nil {
		fmt.Fprintln(os.Stderr, "llamaherd-runc:", err)
		os.Exit(127)
	}
	missing, err := missingCapabilities()
	if err != nil {
		fmt.Fprintln(os.Stderr, "llamaherd-runc: reading the capability bounding set:", err)
		os.Exit(1)
	}
	if len(missing) > 0 {
		if file := specFile(args); file != "" {
			if err := removeCapabilities(file, missing); err != nil {
				fmt.Fprintf(os.Stderr, "llamaherd-runc: editing %s: %v\n", file, err)
				os.Exit(1)
			}
		}
	}
	if err := syscall.Exec(real, append([]string{real}, args...), os.Environ()); err != nil {
		fmt.Fprintf(os.Stderr, "llamaherd-runc: exec %s: %v\n", real, err)
		os.Exit(127)
	}
}

// realRunc is $LLAMAHERD_RUNC, else the first runc on PATH or in the usual places.
func realRunc() (string, error) {
	if path := os.Getenv("LLAMAHERD_RUNC"); path != "" {
		return path, nil
	}
	if path, err := exec.LookPath("runc"); err == nil {
		return path, nil
	}
	for _, path := range []string{"/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/local/bin/runc"} {
		if info, err := os.Stat(path); err == nil && !info.IsDir() {
			return path, nil
		}
	}
	return "", fmt.Errorf("no runc found (set LLAMAHERD_RUNC)")
}

// missingCapabilities lists the removable capabilities absent from this process's bounding set.
func missingCapabilities() (map[string]bool, error) {
	file, err := os.Open("/proc/self/status")
	if err != nil {
		return nil, err
	}
	defer file.Close()
	scanner := bufio.NewScanner(file)
	for scanner.Scan() {
		line := scanner.Text()
		if !strings.HasPrefix(line, "CapBnd:") {
			continue
		}
		bounding, err := strconv.ParseUint(strings.TrimSpace(line[len("CapBnd:"):]), 16, 64)
		if err != nil {
			return nil, err
		}
		missing := map[string]bool{}
		for name, bit := range removable {
			if bounding&(1<<bit) == 0 {
				missing[name] = true
			}
		}
		return missing, nil
	}
	if err := scanner.Err(); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("no CapBnd line")
}

// specFile is the JSON file that holds the process capabilities for this runc call, or "".
func specFile(args []string) string {
	command, rest := splitCommand(args)
	switch command {
	case "create", "run":
		bundle := flagValue(rest, "--bundle", "-b")
		if bundle == "" {
			bundle = "."
		}
		return filepath.Join(bundle, "config.json")
	case "exec":
		return flagValue(rest, "--process", "-p")
	}
	return ""
}

// splitCommand finds runc's subcommand after its global flags.
func splitCommand(args []string) (string, []string) {
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if !strings.HasPrefix(arg, "-") {
			return arg, args[i+1:]
		}
		if globalWithValue[arg] {
			i++
		}
	}
	return "", nil
}

// flagValue returns the value of a flag given as `--long V`, `--long=V`, `-s V` or `-s=V`.
func flagValue(args []string, long, short string) string {
	for i, arg := range args {
		for _, name := range []string{long, short} {
			if arg == name && i+1 < len(args) {
				return args[i+1]
			}
			if strings.HasPrefix(arg, name+"=") {
				return arg[len(name)+1:]
			}
		}
	}
	return ""
}

// removeCapabilities drops the names in missing from every capability set of the file's process
// (config.json holds it under "process", process.json is the process itself).
func removeCapabilities(path string, missing map[string]bool) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		return err
	}
	process := doc
	if inner, ok := doc["process"].(map[string]any); ok {
		process = inner
	}
	caps, ok := process["capabilities"].(map[string]any)
	if !ok {
		return nil
	}
	changed := false
	for set, value := range caps {
		list, ok := value.([]any)
		if !ok {
			continue
		}
		kept := make([]any, 0, len(list))
		for _, item := range list {
			if name, ok := item.(string); ok && missing[name] {
				changed = true
				continue
			}
			kept = append(kept, item)
		}
		caps[set] = kept
	}
	if !changed {
		return nil
	}
	out, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	tmp := path + ".llamaherd-runc"
	if err := os.WriteFile(tmp, out, info.Mode().Perm()); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
