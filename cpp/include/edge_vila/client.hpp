// edge-vila C++ client: send a camera frame and a prompt to `edge-vila serve`
// (OpenAI-compatible /v1/chat/completions) and receive the answer as it streams.
//
// Dependency-free C++17 over POSIX sockets, meant for a robot program on the same
// machine (the server binds loopback by default). Plain HTTP only: put a TLS proxy in
// front of the server if it must be reached over a network.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace edge_vila {

struct Image {
  std::vector<std::uint8_t> bytes;  // an encoded image file (PNG or JPEG)
  std::string mime = "image/jpeg";  // image/png, image/jpeg

  static Image from_file(const std::string& path);  // mime from the extension
};

struct ChatOptions {
  int max_tokens = 64;
  double temperature = 0.0;  // 0 = greedy
  std::string system;        // optional system prompt
  int timeout_ms = 60000;    // socket receive timeout
};

struct ChatResult {
  std::string text;
  std::string finish_reason;  // "stop" or "length"
  double ttft_s = 0.0;        // request sent -> first streamed token
  double total_s = 0.0;
};

// An HTTP error from the server (4xx/5xx) with its JSON error message.
class ServerError : public std::runtime_error {
 public:
  ServerError(int status, const std::string& message)
      : std::runtime_error("HTTP " + std::to_string(status) + ": " + message), status(status) {}
  int status;
};

class Client {
 public:
  explicit Client(std::string host = "127.0.0.1", int port = 8000, std::string api_key = "");

  // GET /health; false if the server is not reachable.
  bool healthy() const;

  // Ask about the images (may be empty) and stream the answer: on_delta gets each piece of
  // text as it arrives. Throws ServerError for 4xx/5xx, std::runtime_error on I/O errors.
  ChatResult chat(const std::string& prompt, const std::vector<Image>& images,
                  const std::function<void(const std::string&)>& on_delta = nullptr,
                  const ChatOptions& options = {}) const;

 private:
  std::string host_;
  int port_;
  std::string api_key_;
};

// Helpers, exposed for tests.
std::string base64_encode(const std::vector<std::uint8_t>& data);
std::string json_escape(const std::string& s);
// Value of the string field `key` in a flat JSON text (first occurrence), unescaped; empty if absent.
bool json_string_field(const std::string& json, const std::string& key, std::string* out);

}  // namespace edge_vila
