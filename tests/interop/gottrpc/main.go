// gottrpc is the Go side of kata-py's ttrpc interop tests and latency benchmark.
//
// It uses github.com/containerd/ttrpc 1.1.1 (the version containerd 1.6.20 pins) from Debian's
// GOPATH, with gogo's types.StringValue as payload, and serves or calls the test service
// "kata.test.Echo":
//
//	Echo      returns the request
//	Fail      value "CODE:message" -> status CODE with message
//	Sleep     value is a Go duration; honours the request deadline (DeadlineExceeded)
//	Metadata  value is a key; returns its metadata values joined by ","
//
// Modes:
//
//	gottrpc server -socket PATH           prints "READY" once listening; exits when stdin closes
//	gottrpc call -socket PATH -method M -value V [-service S] [-timeout D] [-md k=v]...
//	                                       prints {"code","message","value"} as JSON
//	gottrpc bench -socket PATH -n N -c C   prints {"p50_us","p90_us","p99_us","calls_per_s"}
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const service = "kata.test.Echo"

type mdFlag []string

func (m *mdFlag) String() string     { return strings.Join(*m, ",") }
func (m *mdFlag) Set(v string) error { *m = append(*m, v); return nil }

func unary(fn func(ctx context.Context, in string) (string, error)) ttrpc.Method {
	return func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
		var req types.StringValue
		if err := unmarshal(&req); err != nil {
			return nil, err
		}
		out, err := fn(ctx, req.Value)
		if err != nil {
			return nil, err
		}
		return &types.StringValue{Value: out}, nil
	}
}

func serve(path string) error {
	srv, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	srv.Register(service, map[string]ttrpc.Method{
		"Echo": unary(func(ctx context.Context, in string) (string, error) { return in, nil }),
		"Fail": unary(func(ctx context.Context, in string) (string, error) {
			parts := strings.SplitN(in, ":", 2)
			code, err := strconv.Atoi(parts[0])
			if err != nil || len(parts) != 2 {
				return "", status.Errorf(codes.InvalidArgument, "bad Fail request %q", in)
			}
			return "", status.Error(codes.Code(code), parts[1])
		}),
		"Sleep": unary(func(ctx context.Context, in string) (string, error) {
			d, err := time.ParseDuration(in)
			if err != nil {
				return "", status.Errorf(codes.InvalidArgument, "bad duration %q", in)
			}
			select {
			case <-ctx.Done():
				return "", ctx.Err()
			case <-time.After(d):
				return "slept", nil
			}
		}),
		"Metadata": unary(func(ctx context.Context, in string) (string, error) {
			md, _ := ttrpc.GetMetadata(ctx)
			values, _ := md.Get(in)
			return strings.Join(values, ","), nil
		}),
	})
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	fmt.Println("READY")
	// The parent holds our stdin: when it goes away (even killed), so do we.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		_ = srv.Close()
		os.Exit(0)
	}()
	err = srv.Serve(context.Background(), l)
	if err == ttrpc.ErrServerClosed {
		return nil
	}
	return err
}

func dial(path string) (*ttrpc.Client, error) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return nil, err
	}
	return ttrpc.NewClient(conn), nil
}

type callResult struct {
	Code    uint32 `json:"code"`
	Message string `json:"message"`
	Value   string `json:"value"`
}

func call(path, svc, method, value string, timeout time.Duration, md []string) error {
	client, err := dial(path)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if len(md) > 0 {
		meta := ttrpc.MD{}
		for _, kv := range md {
			parts := strings.SplitN(kv, "=", 2)
			meta.Append(parts[0], parts[1])
		}
		ctx = ttrpc.WithMetadata(ctx, meta)
	}
	var resp types.StringValue
	err = client.Call(ctx, svc, method, &types.StringValue{Value: value}, &resp)
	st, _ := status.FromError(err) // non-status errors (ErrClosed, ctx errors) become Unknown
	if err == context.DeadlineExceeded {
		st = status.New(codes.DeadlineExceeded, err.Error())
	}
	return json.NewEncoder(os.Stdout).Encode(callResult{uint32(st.Code()), st.Message(), resp.Value})
}

func bench(path string, n, concurrency int) error {
	client, err := dial(path)
	if err != nil {
		return err
	}
	defer client.Close()
	req := &types.StringValue{Value: "ping"}
	for i := 0; i < 50; i++ { // warm up
		var resp types.StringValue
		if err := client.Call(context.Background(), service, "Echo", req, &resp); err != nil {
			return err
		}
	}
	lat := make([]time.Duration, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	next := 0
	start := time.Now()
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= n {
					return
				}
				var resp types.StringValue
				t0 := time.Now()
				err := client.Call(context.Background(), service, "Echo", req, &resp)
				lat[i] = time.Since(t0)
				if err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if firstErr != nil {
		return firstErr
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		return float64(lat[int(p*float64(n-1))].Nanoseconds()) / 1e3
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]float64{
		"p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99),
		"calls_per_s": float64(n) / elapsed.Seconds(),
	})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gottrpc server|call|bench [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path")
	svc := fs.String("service", service, "service name (call)")
	method := fs.String("method", "Echo", "method name (call)")
	value := fs.String("value", "", "request StringValue (call)")
	timeout := fs.Duration("timeout", 0, "call deadline, 0 = none (call)")
	n := fs.Int("n", 1000, "number of calls (bench)")
	concurrency := fs.Int("c", 1, "concurrent callers (bench)")
	var md mdFlag
	fs.Var(&md, "md", "metadata key=value, repeatable (call)")
	_ = fs.Parse(os.Args[2:])

	var err error
	switch os.Args[1] {
	case "server":
		err = serve(*socket)
	case "call":
		err = call(*socket, *svc, *method, *value, *timeout, md)
	case "bench":
		err = bench(*socket, *n, *concurrency)
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gottrpc:", err)
		os.Exit(1)
	}
}
