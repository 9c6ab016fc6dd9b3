// grpc-echo: the gRPC backend of `make bench` (bench/run.sh, section grpc). A grpc-go server
// (google.golang.org/grpc) serving edge.test.Echo/Unary from integration-tests/servers/grpc/echo.proto
// on 127.0.0.1 only: it answers each request with the request's own bytes, which decode as an
// EchoReply with the same `text` (field 1 in both messages). A raw-bytes codec stands in for
// generated protobuf code, so nothing is generated and the server's cost per call is grpc-go's
// own (HTTP/2, framing, flow control), not message (de)serialisation.
//
//	grpc-echo 127.0.0.1:PORT      prints "ready" once serving; SIGTERM/SIGINT stop it.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
)

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("grpc-echo: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("grpc-echo: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

var _ encoding.Codec = rawCodec{}

func unary(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	return &in, nil
}

func main() {
	if len(os.Args) != 2 || !strings.HasPrefix(os.Args[1], "127.0.0.1:") {
		fmt.Fprintln(os.Stderr, "usage: grpc-echo 127.0.0.1:PORT")
		os.Exit(2)
	}
	lis, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpc-echo: listen:", err)
		os.Exit(1)
	}
	s := grpc.NewServer(grpc.ForceServerCodec(rawCodec{}))
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "edge.test.Echo",
		HandlerType: (*any)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Unary", Handler: unary}},
		Metadata:    "echo.proto",
	}, struct{}{})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		s.GracefulStop()
	}()
	fmt.Println("ready")
	if err := s.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, "grpc-echo: serve:", err)
		os.Exit(1)
	}
}
