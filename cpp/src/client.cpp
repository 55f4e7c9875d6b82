// edge-vila C++ client: HTTP/1.1 over POSIX sockets, SSE parsing, minimal JSON helpers.
#include "edge_vila/client.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

namespace edge_vila {
namespace {

using Clock = std::chrono::steady_clock;

// A connected socket, closed on scope exit.
class Socket {
 public:
  Socket(const std::string& host, int port, int timeout_ms) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0)
      throw std::runtime_error("cannot resolve " + host);
    for (addrinfo* a = res; a; a = a->ai_next) {
      fd_ = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
      if (fd_ < 0) continue;
      timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
      setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      if (::connect(fd_, a->ai_addr, a->ai_addrlen) == 0) break;
      ::close(fd_);
      fd_ = -1;
    }
    freeaddrinfo(res);
    if (fd_ < 0) throw std::runtime_error("cannot connect to " + host + ":" + std::to_string(port));
  }
  ~Socket() {
    if (fd_ >= 0) ::close(fd_);
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  void send_all(const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
      ssize_t n = ::send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n <= 0) throw std::runtime_error("send failed");
      off += static_cast<size_t>(n);
    }
  }
  // Appends what arrived to buf; false at end of stream.
  bool recv_some(std::string* buf) {
    char tmp[8192];
    ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
    if (n < 0) throw std::runtime_error("receive failed or timed out");
    if (n == 0) return false;
    buf->append(tmp, static_cast<size_t>(n));
    return true;
  }

 private:
  int fd_ = -1;
};

void append_utf8(std::string* out, unsigned cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Response framing: status + headers, then the body through a chunked decoder if needed.
struct Response {
  int status = 0;
  bool chunked = false;
  bool headers_done = false;
  std::string raw;   // bytes not yet consumed
  std::string body;  // decoded body bytes not yet consumed by the caller

  // Move decodable bytes from raw to body. Returns false when the chunked body ended.
  bool decode() {
    if (!headers_done) {
      size_t end = raw.find("\r\n\r\n");
      if (end == std::string::npos) return true;
      std::string head = raw.substr(0, end);
      raw.erase(0, end + 4);
      headers_done = true;
      if (head.size() < 12) throw std::runtime_error("bad HTTP response");
      status = std::stoi(head.substr(9, 3));
      std::string lower = head;
      for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      chunked = lower.find("transfer-encoding: chunked") != std::string::npos;
    }
    if (!chunked) {
      body += raw;
      raw.clear();
      return true;
    }
    while (true) {
      size_t eol = raw.find("\r\n");
      if (eol == std::string::npos) return true;
      size_t size = std::stoul(raw.substr(0, eol), nullptr, 16);
      if (size == 0) return false;
      if (raw.size() < eol + 2 + size + 2) return true;
      body.append(raw, eol + 2, size);
      raw.erase(0, eol + 2 + size + 2);
    }
  }
};

}  // namespace

Image Image::from_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open image " + path);
  Image img;
  img.bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  auto dot = path.find_last_of('.');
  std::string ext = dot == std::string::npos ? "" : path.substr(dot + 1);
  for (auto& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  img.mime = ext == "png" ? "image/png" : "image/jpeg";
  return img;
}

std::string base64_encode(const std::vector<std::uint8_t>& data) {
  static const char* tbl = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((data.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < data.size(); i += 3) {
    unsigned v = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += tbl[(v >> 6) & 63];
    out += tbl[v & 63];
  }
  if (i + 1 == data.size()) {
    unsigned v = data[i] << 16;
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == data.size()) {
    unsigned v = (data[i] << 16) | (data[i + 1] << 8);
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += tbl[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

bool json_string_field(const std::string& json, const std::string& key, std::string* out) {
  std::string pat = "\"" + key + "\"";
  size_t p = json.find(pat);
  if (p == std::string::npos) return false;
  p += pat.size();
  while (p < json.size() && (json[p] == ' ' || json[p] == ':')) ++p;
  if (p >= json.size() || json[p] != '"') return false;
  out->clear();
  for (++p; p < json.size(); ++p) {
    char c = json[p];
    if (c == '"') return true;
    if (c != '\\') {
      out->push_back(c);
      continue;
    }
    if (++p >= json.size()) return false;
    switch (json[p]) {
      case 'n': out->push_back('\n'); break;
      case 't': out->push_back('\t'); break;
      case 'r': out->push_back('\r'); break;
      case 'b': out->push_back('\b'); break;
      case 'f': out->push_back('\f'); break;
      case 'u': {
        if (p + 4 >= json.size()) return false;
        unsigned cp = std::stoul(json.substr(p + 1, 4), nullptr, 16);
        p += 4;
        if (cp >= 0xD800 && cp < 0xDC00 && p + 6 < json.size() && json[p + 1] == '\\' && json[p + 2] == 'u') {
          unsigned lo = std::stoul(json.substr(p + 3, 4), nullptr, 16);
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          p += 6;
        }
        append_utf8(out, cp);
        break;
      }
      default: out->push_back(json[p]);  // \" \\ \/
    }
  }
  return false;
}

Client::Client(std::string host, int port, std::string api_key)
    : host_(std::move(host)), port_(port), api_key_(std::move(api_key)) {}

bool Client::healthy() const {
  try {
    Socket s(host_, port_, 2000);
    s.send_all("GET /health HTTP/1.1\r\nHost: " + host_ + "\r\nConnection: close\r\n\r\n");
    Response r;
    while (s.recv_some(&r.raw)) {
      r.decode();
      if (r.headers_done) break;
    }
    r.decode();
    return r.status == 200;
  } catch (const std::exception&) {
    return false;
  }
}

ChatResult Client::chat(const std::string& prompt, const std::vector<Image>& images,
                        const std::function<void(const std::string&)>& on_delta, const ChatOptions& o) const {
  std::ostringstream body;
  body << "{\"stream\":true,\"max_tokens\":" << o.max_tokens << ",\"temperature\":" << o.temperature
       << ",\"messages\":[";
  if (!o.system.empty()) body << "{\"role\":\"system\",\"content\":\"" << json_escape(o.system) << "\"},";
  body << "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"" << json_escape(prompt) << "\"}";
  for (const auto& img : images)
    body << ",{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:" << img.mime << ";base64,"
         << base64_encode(img.bytes) << "\"}}";
  body << "]}]}";
  const std::string payload = body.str();
  std::ostringstream req;
  req << "POST /v1/chat/completions HTTP/1.1\r\nHost: " << host_ << ":" << port_
      << "\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\n";
  if (!api_key_.empty()) req << "Authorization: Bearer " << api_key_ << "\r\n";
  req << "Content-Length: " << payload.size() << "\r\n\r\n" << payload;

  ChatResult result;
  auto t0 = Clock::now();
  Socket s(host_, port_, o.timeout_ms);
  s.send_all(req.str());
  Response r;
  bool open = true, done = false;
  std::string line_buf;
  while (!done) {
    bool more = open && s.recv_some(&r.raw);
    open = more;
    bool body_open = r.decode();
    if (!r.headers_done) {
      if (!open) throw std::runtime_error("connection closed before the response headers");
      continue;
    }
    if (r.status != 200) {  // error bodies are small JSON: read them whole
      if (open && body_open) continue;
      std::string msg;
      if (!json_string_field(r.body, "message", &msg)) msg = r.body;
      throw ServerError(r.status, msg);
    }
    line_buf += r.body;
    r.body.clear();
    size_t eol;
    while ((eol = line_buf.find('\n')) != std::string::npos) {
      std::string line = line_buf.substr(0, eol);
      line_buf.erase(0, eol + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.rfind("data: ", 0) != 0) continue;
      std::string data = line.substr(6);
      if (data == "[DONE]") {
        done = true;
        break;
      }
      std::string msg;
      if (data.find("\"error\"") != std::string::npos && json_string_field(data, "message", &msg))
        throw ServerError(500, msg);
      std::string reason;
      if (json_string_field(data, "finish_reason", &reason)) result.finish_reason = reason;
      size_t delta = data.find("\"delta\"");
      std::string piece;
      if (delta != std::string::npos && json_string_field(data.substr(delta), "content", &piece) && !piece.empty()) {
        if (result.text.empty())
          result.ttft_s = std::chrono::duration<double>(Clock::now() - t0).count();
        result.text += piece;
        if (on_delta) on_delta(piece);
      }
    }
    if (!open || !body_open) break;
  }
  result.total_s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!done) throw std::runtime_error("stream ended without [DONE]");
  return result;
}

}  // namespace edge_vila
