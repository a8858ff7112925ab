// pforte inbox: CSRF header for htmx, errors shown inside forms, live updates over Server-Sent Events,
// reply-to, keeping the thread scrolled to the newest message. No inline scripts (strict CSP).
(function () {
  "use strict";

  // Live-update refreshes say so, so that an unattended open tab does not extend its session.
  var BACKGROUND = { "X-Pforte-Refresh": "1" };

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  // Every htmx request carries the session's CSRF token.
  document.addEventListener("htmx:configRequest", function (evt) {
    var token = csrfToken();
    if (token) {
      evt.detail.headers["X-CSRF-Token"] = token;
    }
  });

  // Error responses (4xx/5xx) are HTML fragments in words: show them in the form that caused them.
  document.addEventListener("htmx:beforeSwap", function (evt) {
    var status = evt.detail.xhr.status;
    if (status === 401) {
      evt.detail.shouldSwap = false;
      window.location.assign(document.body.dataset.loginUrl || "/login");
      return;
    }
    if (status < 400) {
      return;
    }
    // beforeSwap fires on the swap target; the element that made the request is in requestConfig.
    var elt = (evt.detail.requestConfig && evt.detail.requestConfig.elt) || evt.detail.elt || evt.target;
    var form = elt instanceof Element ? elt.closest("form") : null;
    var slot = form ? form.querySelector(".form-error") : null;
    if (slot) {
      evt.detail.target = slot;
      evt.detail.swapOverride = "innerHTML";
      evt.detail.shouldSwap = true;
      evt.detail.isError = false;
    }
  });

  // After a successful send: clear the form, its error and the reply-to, show the newest message.
  document.addEventListener("htmx:afterRequest", function (evt) {
    var form = evt.detail.elt;
    var xhr = evt.detail.xhr;
    // An error fragment swapped in by the handler above counts as "successful" for htmx: check the status.
    if (!form || form.tagName !== "FORM" || !evt.detail.successful || !xhr || xhr.status >= 400) {
      return;
    }
    var slot = form.querySelector(".form-error");
    if (slot) {
      slot.textContent = "";
    }
    if (form.hasAttribute("data-reset-on-success")) {
      form.reset();
      clearReply(form);
      freshKey(form);
    }
    scrollThread(true);
  });

  // The next message gets a new one-time key; a resent form (lost answer) keeps the old one, and the
  // server queues it only once.
  function freshKey(form) {
    var input = form.querySelector("[data-client-key]");
    if (!input) {
      return;
    }
    var bytes = new Uint8Array(18);
    window.crypto.getRandomValues(bytes);
    input.value = Array.prototype.map.call(bytes, function (b) {
      return ("0" + b.toString(16)).slice(-2);
    }).join("");
  }

  // -- thread scrolling ---------------------------------------------------------------------------

  function thread() {
    return document.getElementById("thread");
  }

  function nearBottom() {
    var t = thread();
    return !t || t.scrollHeight - t.scrollTop - t.clientHeight < 80;
  }

  function scrollThread(force) {
    var t = thread();
    if (t && force) {
      t.scrollTop = t.scrollHeight;
    }
  }

  // -- reply to a message -------------------------------------------------------------------------

  function clearReply(form) {
    var box = form.querySelector("[data-reply-box]");
    if (!box) {
      return;
    }
    box.hidden = true;
    box.querySelector("[data-reply-id]").value = "";
    box.querySelector("[data-reply-text]").textContent = "";
  }

  document.addEventListener("click", function (evt) {
    var target = evt.target instanceof Element ? evt.target : null;
    if (!target) {
      return;
    }
    var link = target.closest("[data-reply-to]");
    if (link) {
      var form = document.querySelector(".reply-form");
      if (!form) {
        return;
      }
      evt.preventDefault();
      var id = link.getAttribute("data-reply-to");
      var msg = document.getElementById("msg-" + id);
      var text = msg ? msg.querySelector(".text") : null;
      var box = form.querySelector("[data-reply-box]");
      box.querySelector("[data-reply-id]").value = id;
      box.querySelector("[data-reply-text]").textContent = text ? text.textContent.trim().slice(0, 140) : "";
      box.hidden = false;
      form.querySelector("textarea").focus();
      return;
    }
    var cancel = target.closest("[data-reply-cancel]");
    if (cancel) {
      clearReply(cancel.closest("form"));
    }
  });

  // Ctrl+Enter (or Cmd+Enter) sends.
  document.addEventListener("keydown", function (evt) {
    var target = evt.target;
    if (evt.key === "Enter" && (evt.ctrlKey || evt.metaKey) && target instanceof HTMLTextAreaElement && target.form) {
      evt.preventDefault();
      target.form.requestSubmit();
    }
  });

  // -- live updates -------------------------------------------------------------------------------

  var pending = { list: false, thread: false };
  var timer = null;
  var busy = false;

  function openConversation() {
    return document.getElementById("conversation");
  }

  function refreshThread() {
    var conv = openConversation();
    var t = thread();
    if (!conv || !t || typeof htmx === "undefined") {
      return Promise.resolve();
    }
    var composer = document.getElementById("composer");
    var params = new URLSearchParams();
    params.set("seen", document.visibilityState === "visible" ? "1" : "0");
    if (composer && composer.dataset.window) {
      params.set("window", composer.dataset.window);
    }
    var stick = nearBottom();
    var before = t.scrollTop;
    return htmx.ajax("GET", conv.dataset.messagesUrl + "?" + params.toString(), { target: t, swap: "innerHTML", headers: BACKGROUND })
      .then(function () {
        if (stick) {
          scrollThread(true);
        } else {
          t.scrollTop = before;
        }
      });
  }

  function refreshList() {
    var list = document.getElementById("conversation-list");
    var url = document.body.dataset.listUrl;
    if (!list || !url || typeof htmx === "undefined") {
      return Promise.resolve();
    }
    var conv = openConversation();
    if (conv) {
      url += "?active=" + encodeURIComponent(conv.dataset.conversationId);
    }
    return htmx.ajax("GET", url, { target: list, swap: "innerHTML", headers: BACKGROUND });
  }

  function flush() {
    timer = null;
    if (busy) {
      schedule();
      return;
    }
    var doThread = pending.thread;
    var doList = pending.list;
    pending.thread = false;
    pending.list = false;
    busy = true;
    // The thread first: it marks the conversation seen, so the list then shows it as read.
    var first = doThread ? refreshThread() : Promise.resolve();
    first
      .then(function () {
        return doList ? refreshList() : null;
      })
      .catch(function () {
        return null;
      })
      .then(function () {
        busy = false;
      });
  }

  function schedule() {
    if (timer === null) {
      timer = window.setTimeout(flush, 120);
    }
  }

  function connect() {
    var url = document.body.dataset.eventsUrl;
    if (!url || typeof EventSource === "undefined") {
      return;
    }
    var source = new EventSource(url);
    var opened = false;
    source.addEventListener("open", function () {
      document.body.dataset.live = "connected";
      if (opened) {
        // Reconnected: events may have been missed meanwhile.
        pending.list = true;
        pending.thread = true;
        schedule();
      }
      opened = true;
    });
    source.addEventListener("conversation", function (evt) {
      var data = {};
      try {
        data = JSON.parse(evt.data);
      } catch (e) {
        data = {};
      }
      pending.list = true;
      var conv = openConversation();
      if (conv && data.conversation_id === conv.dataset.conversationId) {
        pending.thread = true;
      }
      schedule();
    });
    source.addEventListener("channel", function () {
      pending.list = true;
      if (openConversation()) {
        pending.thread = true;
      }
      schedule();
    });
    source.addEventListener("logout", function () {
      source.close();
      window.location.assign(document.body.dataset.loginUrl || "/login");
    });
    source.addEventListener("error", function () {
      document.body.dataset.live = "disconnected";
      if (source.readyState === EventSource.CLOSED) {
        window.setTimeout(connect, 5000);
      }
    });
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible" && openConversation()) {
      pending.thread = true;
      pending.list = true;
      schedule();
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    scrollThread(true);
    connect();
  });
})();
