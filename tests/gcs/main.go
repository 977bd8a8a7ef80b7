// The GCS server of the test suite: fake-gcs-server (its fakestorage library, in memory) with
// the XML API that object_store's GCS client speaks and fake-gcs-server does not serve:
// path-style object PUT with `x-goog-if-generation-match` (conditional create), copy with
// `x-goog-copy-source`, XML multipart uploads and ListObjectsV2. Reads (GET and HEAD with
// ranges), deletes, bucket creation and the JSON API go to fake-gcs-server's own handlers
// where they serve what object_store needs.
//
// Every object write takes one lock, so a conditional create checks and writes atomically, as
// GCS does (tests/py/moto_server.py does the same for moto). What real GCS adds and this
// cannot prove: its generation numbers and precondition semantics under concurrent writers
// across its frontends, and its request rates.
//
//	lakesink-gcs -host 127.0.0.1 -port N
package main

import (
	"bytes"
	"encoding/xml"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fsouza/fake-gcs-server/fakestorage"
)

type upload struct {
	bucket, name string
	parts        map[int][]byte
}

type server struct {
	fake    *fakestorage.Server
	inner   http.Handler
	mu      sync.Mutex // every object write
	uploads map[string]*upload
	next    int
}

func main() {
	host := flag.String("host", "127.0.0.1", "listen address")
	port := flag.Int("port", 4443, "listen port")
	flag.Parse()
	addr := fmt.Sprintf("%s:%d", *host, *port)
	fake, err := fakestorage.NewServerWithOptions(fakestorage.Options{
		NoListener:  true,
		Scheme:      "http",
		Host:        *host,
		Port:        uint16(*port),
		PublicHost:  addr,
		ExternalURL: "http://" + addr,
	})
	if err != nil {
		log.Fatal(err)
	}
	s := &server{fake: fake, inner: fake.HTTPHandler(), uploads: map[string]*upload{}}
	log.Printf("GCS (fake-gcs-server with object_store's XML API) on http://%s", addr)
	log.Fatal(http.ListenAndServe(addr, s))
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := strings.TrimPrefix(r.URL.EscapedPath(), "/")
	for _, api := range []string{"storage/", "upload/", "download/", "batch/", "_internal/"} {
		if strings.HasPrefix(p, api) {
			s.inner.ServeHTTP(w, r)
			return
		}
	}
	rawBucket, rawName, _ := strings.Cut(p, "/")
	bucket, err := url.PathUnescape(rawBucket)
	if err != nil {
		xmlError(w, http.StatusBadRequest, "InvalidArgument", err.Error())
		return
	}
	name, err := url.PathUnescape(rawName)
	if err != nil {
		xmlError(w, http.StatusBadRequest, "InvalidArgument", err.Error())
		return
	}
	q := r.URL.Query()
	switch {
	case name == "" && r.Method == http.MethodGet:
		s.list(w, bucket, q)
	case r.Method == http.MethodPost && q.Has("uploads"):
		s.initiate(w, bucket, name)
	case r.Method == http.MethodPut && q.Has("uploadId"):
		s.part(w, r, q)
	case r.Method == http.MethodPost && q.Has("uploadId"):
		s.complete(w, r, q)
	case r.Method == http.MethodDelete && q.Has("uploadId"):
		s.mu.Lock()
		delete(s.uploads, q.Get("uploadId"))
		s.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	case r.Method == http.MethodPut && r.Header.Get("x-goog-copy-source") != "":
		s.copy(w, r, bucket, name)
	case r.Method == http.MethodPut:
		body, err := io.ReadAll(r.Body)
		if err != nil {
			xmlError(w, http.StatusBadRequest, "IncompleteBody", err.Error())
			return
		}
		s.create(w, r, bucket, name, body, r.Header.Get("Content-Type"))
	case r.Method == http.MethodGet || r.Method == http.MethodHead:
		s.get(w, r, bucket, name)
	case r.Method == http.MethodDelete:
		s.mu.Lock()
		err := s.fake.Backend().DeleteObject(bucket, name)
		s.mu.Unlock()
		if err != nil {
			xmlError(w, http.StatusNotFound, "NoSuchKey", "no such object")
			return
		}
		w.WriteHeader(http.StatusNoContent)
	default:
		s.inner.ServeHTTP(w, r)
	}
}

// create writes an object, honouring `x-goog-if-generation-match` (0: only if absent).
func (s *server) create(w http.ResponseWriter, r *http.Request, bucket, name string, body []byte, contentType string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := r.Header.Get("x-goog-if-generation-match"); m != "" {
		want, err := strconv.ParseInt(m, 10, 64)
		if err != nil {
			xmlError(w, http.StatusBadRequest, "InvalidArgument", "bad x-goog-if-generation-match")
			return
		}
		var have int64
		if cur, err := s.fake.GetObject(bucket, name); err == nil {
			have = cur.Generation
		}
		if have != want {
			xmlError(w, http.StatusPreconditionFailed, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
			return
		}
	}
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	s.fake.CreateObject(fakestorage.Object{
		ObjectAttrs: fakestorage.ObjectAttrs{BucketName: bucket, Name: name, ContentType: contentType},
		Content:     body,
	})
	obj, err := s.fake.GetObject(bucket, name)
	if err != nil {
		xmlError(w, http.StatusNotFound, "NoSuchBucket", err.Error())
		return
	}
	w.Header().Set("ETag", etag(obj))
	w.Header().Set("x-goog-generation", strconv.FormatInt(obj.Generation, 10))
	w.WriteHeader(http.StatusOK)
}

func (s *server) copy(w http.ResponseWriter, r *http.Request, bucket, name string) {
	src, err := url.PathUnescape(strings.TrimPrefix(r.Header.Get("x-goog-copy-source"), "/"))
	if err != nil {
		xmlError(w, http.StatusBadRequest, "InvalidArgument", err.Error())
		return
	}
	srcBucket, srcName, _ := strings.Cut(src, "/")
	obj, err := s.fake.GetObject(srcBucket, srcName)
	if err != nil {
		xmlError(w, http.StatusNotFound, "NoSuchKey", "no such source object")
		return
	}
	s.create(w, r, bucket, name, obj.Content, obj.ContentType)
}

func etag(obj fakestorage.Object) string {
	e := obj.Etag
	if e == "" {
		e = obj.Md5Hash
	}
	return `"` + strings.Trim(e, `"`) + `"`
}

func (s *server) get(w http.ResponseWriter, r *http.Request, bucket, name string) {
	obj, err := s.fake.GetObject(bucket, name)
	if err != nil {
		xmlError(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	}
	h := w.Header()
	h.Set("ETag", etag(obj))
	h.Set("x-goog-generation", strconv.FormatInt(obj.Generation, 10))
	h.Set("Last-Modified", obj.Updated.UTC().Format(http.TimeFormat))
	h.Set("Content-Type", obj.ContentType)
	h.Set("Accept-Ranges", "bytes")
	data := obj.Content
	status := http.StatusOK
	if rg := r.Header.Get("Range"); rg != "" {
		start, end, ok := parseRange(rg, int64(len(data)))
		if !ok {
			h.Set("Content-Range", fmt.Sprintf("bytes */%d", len(data)))
			xmlError(w, http.StatusRequestedRangeNotSatisfiable, "InvalidRange", "bad range")
			return
		}
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end-1, len(data)))
		data = data[start:end]
		status = http.StatusPartialContent
	}
	h.Set("Content-Length", strconv.Itoa(len(data)))
	w.WriteHeader(status)
	if r.Method == http.MethodGet {
		_, _ = w.Write(data)
	}
}

// parseRange reads one `bytes=a-b`, `bytes=a-` or `bytes=-n`; returns [start, end).
func parseRange(rg string, size int64) (int64, int64, bool) {
	spec, ok := strings.CutPrefix(rg, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	a, b, _ := strings.Cut(spec, "-")
	if a == "" {
		n, err := strconv.ParseInt(b, 10, 64)
		if err != nil || n <= 0 {
			return 0, 0, false
		}
		return max(size-n, 0), size, true
	}
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil || start >= size {
		return 0, 0, false
	}
	end := size
	if b != "" {
		e, err := strconv.ParseInt(b, 10, 64)
		if err != nil || e < start {
			return 0, 0, false
		}
		end = min(e+1, size)
	}
	return start, end, true
}

type listContents struct {
	Key          string `xml:"Key"`
	LastModified string `xml:"LastModified"`
	ETag         string `xml:"ETag"`
	Size         int64  `xml:"Size"`
}

type listPrefix struct {
	Prefix string `xml:"Prefix"`
}

type listResult struct {
	XMLName        xml.Name       `xml:"ListBucketResult"`
	Name           string         `xml:"Name"`
	Prefix         string         `xml:"Prefix"`
	KeyCount       int            `xml:"KeyCount"`
	IsTruncated    bool           `xml:"IsTruncated"`
	Contents       []listContents `xml:"Contents"`
	CommonPrefixes []listPrefix   `xml:"CommonPrefixes"`
}

// list answers ListObjectsV2 (`list-type=2`, `prefix`, `delimiter`, `start-after`) in one page.
func (s *server) list(w http.ResponseWriter, bucket string, q url.Values) {
	prefix, delimiter, after := q.Get("prefix"), q.Get("delimiter"), q.Get("start-after")
	objs, prefixes, err := s.fake.ListObjectsWithOptions(bucket, fakestorage.ListOptions{
		Prefix:    prefix,
		Delimiter: delimiter,
	})
	if err != nil {
		xmlError(w, http.StatusNotFound, "NoSuchBucket", err.Error())
		return
	}
	out := listResult{Name: bucket, Prefix: prefix}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Name < objs[j].Name })
	for _, o := range objs {
		if after != "" && o.Name <= after {
			continue
		}
		e := o.Etag
		if e == "" {
			e = o.Md5Hash
		}
		out.Contents = append(out.Contents, listContents{
			Key:          o.Name,
			LastModified: o.Updated.UTC().Format(time.RFC3339Nano),
			ETag:         `"` + strings.Trim(e, `"`) + `"`,
			Size:         o.Size,
		})
	}
	sort.Strings(prefixes)
	for _, p := range prefixes {
		out.CommonPrefixes = append(out.CommonPrefixes, listPrefix{Prefix: p})
	}
	out.KeyCount = len(out.Contents) + len(out.CommonPrefixes)
	writeXML(w, http.StatusOK, out)
}

func (s *server) initiate(w http.ResponseWriter, bucket, name string) {
	s.mu.Lock()
	s.next++
	id := fmt.Sprintf("upload-%d", s.next)
	s.uploads[id] = &upload{bucket: bucket, name: name, parts: map[int][]byte{}}
	s.mu.Unlock()
	writeXML(w, http.StatusOK, struct {
		XMLName  xml.Name `xml:"InitiateMultipartUploadResult"`
		Bucket   string   `xml:"Bucket"`
		Key      string   `xml:"Key"`
		UploadID string   `xml:"UploadId"`
	}{Bucket: bucket, Key: name, UploadID: id})
}

func (s *server) part(w http.ResponseWriter, r *http.Request, q url.Values) {
	n, err := strconv.Atoi(q.Get("partNumber"))
	body, rerr := io.ReadAll(r.Body)
	if err != nil || rerr != nil {
		xmlError(w, http.StatusBadRequest, "InvalidArgument", "bad part")
		return
	}
	s.mu.Lock()
	u, ok := s.uploads[q.Get("uploadId")]
	if ok {
		u.parts[n] = body
	}
	s.mu.Unlock()
	if !ok {
		xmlError(w, http.StatusNotFound, "NoSuchUpload", "no such upload")
		return
	}
	w.Header().Set("ETag", fmt.Sprintf(`"part-%d-%d"`, n, len(body)))
	w.WriteHeader(http.StatusOK)
}

func (s *server) complete(w http.ResponseWriter, r *http.Request, q url.Values) {
	s.mu.Lock()
	u, ok := s.uploads[q.Get("uploadId")]
	delete(s.uploads, q.Get("uploadId"))
	s.mu.Unlock()
	if !ok {
		xmlError(w, http.StatusNotFound, "NoSuchUpload", "no such upload")
		return
	}
	nums := make([]int, 0, len(u.parts))
	for n := range u.parts {
		nums = append(nums, n)
	}
	sort.Ints(nums)
	var all bytes.Buffer
	for _, n := range nums {
		all.Write(u.parts[n])
	}
	rec := &recorder{header: http.Header{}}
	s.create(rec, r, u.bucket, u.name, all.Bytes(), "application/octet-stream")
	if rec.status != http.StatusOK {
		for k, v := range rec.header {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.status)
		_, _ = w.Write(rec.body.Bytes())
		return
	}
	w.Header().Set("x-goog-generation", rec.header.Get("x-goog-generation"))
	writeXML(w, http.StatusOK, struct {
		XMLName xml.Name `xml:"CompleteMultipartUploadResult"`
		Bucket  string   `xml:"Bucket"`
		Key     string   `xml:"Key"`
		ETag    string   `xml:"ETag"`
	}{Bucket: u.bucket, Key: u.name, ETag: rec.header.Get("ETag")})
}

type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(status int)      { r.status = status }

func writeXML(w http.ResponseWriter, status int, v any) {
	data, err := xml.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(xml.Header))
	_, _ = w.Write(data)
}

func xmlError(w http.ResponseWriter, status int, code, message string) {
	writeXML(w, status, struct {
		XMLName xml.Name `xml:"Error"`
		Code    string   `xml:"Code"`
		Message string   `xml:"Message"`
	}{Code: code, Message: message})
}
