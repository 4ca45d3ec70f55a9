// Command bench-go-tableflip is the benchmark's Go peer: the HTTP contract
// of the tableflip-bench services (see bench/src/lib.rs) served the way a
// user of Go's github.com/cloudflare/tableflip writes a service, following
// its README: upg.Listen for every listener, net/http's Server, upg.Ready
// once serving, then <-upg.Exit() and Server.Shutdown to drain.
//
//   - GET / answers 200 "pid <N>\n" with the header "x-pid: <N>";
//   - GET /slow?ms=N answers the same after N ms (at most 60 s);
//   - anything else answers 404.
//
// Configuration, as for the Rust services: BENCH_ADDR (main listener,
// default 127.0.0.1:8080), BENCH_LISTENERS (listeners in all, the extra
// ones on 127.1.x.y at the main port), PID_FILE (written by tableflip's
// Ready), NOTIFY_SOCKET, BENCH_BALLAST_MIB, BENCH_ANNOUNCE_START.
//
// Go's tableflip does not speak systemd's notify protocol (its README
// documents PIDFile=); the service sends READY=1 and MAINPID= itself right
// after upg.Ready() returns, as a Type=notify service would, so that the
// driver sees each generation's readiness the way it sees the others'.
//
// SIGHUP upgrades; SIGTERM and SIGINT stop gracefully. Logs go to stderr.
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

const (
	// drainTimeout bounds the wait for open connections once this
	// generation must exit (the Rust services use the same 30 s).
	drainTimeout = 30 * time.Second
	// upgradeTimeout: how long the new generation may take to be ready.
	upgradeTimeout = 30 * time.Second
	// maxSlow is the longest wait /slow accepts.
	maxSlow = 60 * time.Second
)

// ballast is held for the life of the process (BENCH_BALLAST_MIB).
var ballast []byte

func main() {
	log.SetPrefix(fmt.Sprintf("bench-go-tableflip[%d]: ", os.Getpid()))
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	if err := run(); err != nil {
		log.Printf("error: %v", err)
		os.Exit(1)
	}
}

func run() error {
	if os.Getenv("BENCH_ANNOUNCE_START") != "" {
		notify(fmt.Sprintf("BENCH_STARTED=1\nMAINPID=%d", os.Getpid()))
	}
	addr := os.Getenv("BENCH_ADDR")
	if addr == "" {
		addr = "127.0.0.1:8080"
	}
	addrs, err := listenAddrs(addr, os.Getenv("BENCH_LISTENERS"))
	if err != nil {
		return err
	}

	upg, err := tableflip.New(tableflip.Options{
		UpgradeTimeout: upgradeTimeout,
		PIDFile:        os.Getenv("PID_FILE"),
	})
	if err != nil {
		return fmt.Errorf("cannot create the upgrader: %w", err)
	}
	defer upg.Stop()

	// Subscribed before readiness, so that a SIGHUP sent as soon as this
	// generation is ready upgrades it (unsubscribed, it would end it).
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	go handleSignals(upg, sig)

	server := &http.Server{Handler: http.HandlerFunc(handle)}
	serving := make(chan error, len(addrs))
	for _, a := range addrs {
		ln, err := upg.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("cannot listen on %s: %w", a, err)
		}
		go func(ln net.Listener) {
			serving <- server.Serve(ln)
		}(ln)
	}

	if err := holdBallast(os.Getenv("BENCH_BALLAST_MIB")); err != nil {
		return err
	}
	if err := upg.Ready(); err != nil {
		return fmt.Errorf("cannot signal readiness: %w", err)
	}
	notify(fmt.Sprintf("READY=1\nMAINPID=%d", os.Getpid()))
	log.Printf("ready on %v (inherited: %v)", addrs, upg.HasParent())

	select {
	case <-upg.Exit():
	case err := <-serving:
		return fmt.Errorf("serving stopped: %w", err)
	}

	// Upgraded (or stopped): stop accepting, close idle connections, and
	// wait for the requests in flight, within the drain timeout.
	log.Printf("exiting: draining")
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	if err := server.Shutdown(ctx); err != nil {
		log.Printf("drain timeout: %v", err)
	}
	return nil
}

// handleSignals upgrades on SIGHUP and stops on SIGTERM or SIGINT.
//
// Go's tableflip refuses an upgrade ("parent hasn't exited") until its
// own goroutine has seen the previous generation exit, which it learns a
// moment after the exit itself; the README's handler only logs the
// refusal, and the SIGHUP is lost. So that every SIGHUP of the bench
// counts, the handler first waits for the parent (WaitForParent), then
// retries a refused upgrade every millisecond for up to a second; this
// time is inside the measured SIGHUP -> ready.
func handleSignals(upg *tableflip.Upgrader, sig <-chan os.Signal) {
	stopping := false
	for s := range sig {
		switch {
		case s == syscall.SIGHUP:
			upgrade(upg)
		case stopping:
			// A second stop signal: stop at once.
			os.Exit(1)
		default:
			stopping = true
			upg.Stop()
		}
	}
}

// upgrade runs one upgrade once the parent generation is gone.
func upgrade(upg *tableflip.Upgrader) {
	ctx, cancel := context.WithTimeout(context.Background(), upgradeTimeout)
	defer cancel()
	if err := upg.WaitForParent(ctx); err != nil {
		log.Printf("waiting for the parent generation: %v", err)
	}
	for tries := 1; ; tries++ {
		err := upg.Upgrade()
		if err == nil {
			return
		}
		if err.Error() != "parent hasn't exited" || tries == 1000 {
			log.Printf("upgrade failed: %v", err)
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// handle answers one request of the contract.
func handle(w http.ResponseWriter, r *http.Request) {
	pid := strconv.Itoa(os.Getpid())
	w.Header().Set("x-pid", pid)
	if r.Method != http.MethodGet {
		http.NotFound(w, r)
		return
	}
	switch r.URL.Path {
	case "/":
	case "/slow":
		ms, err := strconv.ParseUint(r.URL.Query().Get("ms"), 10, 32)
		wait := time.Duration(ms) * time.Millisecond
		if err != nil || wait > maxSlow {
			http.Error(w, "expected /slow?ms=N", http.StatusBadRequest)
			return
		}
		time.Sleep(wait)
	default:
		http.NotFound(w, r)
		return
	}
	fmt.Fprintf(w, "pid %s\n", pid)
}

// listenAddrs returns the main address and, with BENCH_LISTENERS=N, the
// N-1 extra ones: 127.1.x.y at the main address's port.
func listenAddrs(main, count string) ([]string, error) {
	n := 1
	if count != "" {
		var err error
		if n, err = strconv.Atoi(count); err != nil || n < 1 {
			return nil, fmt.Errorf("BENCH_LISTENERS=%q: expected a number", count)
		}
	}
	_, port, err := net.SplitHostPort(main)
	if err != nil {
		return nil, fmt.Errorf("BENCH_ADDR=%q: %w", main, err)
	}
	addrs := []string{main}
	for i := 1; i < n; i++ {
		ip := net.IPv4(127, 1, byte(i>>8), byte(i))
		addrs = append(addrs, net.JoinHostPort(ip.String(), port))
	}
	return addrs, nil
}

// holdBallast allocates BENCH_BALLAST_MIB MiB and writes one byte per
// 4 KiB page, so that the process holds that much more resident memory.
func holdBallast(value string) error {
	if value == "" {
		return nil
	}
	mib, err := strconv.ParseUint(value, 10, 32)
	if err != nil {
		return fmt.Errorf("BENCH_BALLAST_MIB=%q: expected a whole number of MiB (e.g. 256)", value)
	}
	if mib == 0 {
		return nil
	}
	ballast = make([]byte, mib<<20)
	for i := 0; i < len(ballast); i += 4096 {
		ballast[i] = 1
	}
	runtime.KeepAlive(ballast)
	return nil
}

// notify sends one systemd-style notification to NOTIFY_SOCKET, if set;
// errors are ignored, as sd_notify lets the caller do.
func notify(message string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return
	}
	defer conn.Close()
	_, _ = conn.Write([]byte(message))
}
